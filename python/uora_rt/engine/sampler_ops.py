"""The sampler's sync-free draws (engine.sampler holds the Semantics and the API): the seeded
uniform, the temperature-only scan, the top-k / top-p draw from a candidate prefix, and the two
paths that run on the device: one full sort of every row (exact; the fallback and the baseline)
and the top-k window (exact where its prefix fits, a flag where it does not). No function here
reads a value on the host, so each can be captured in a CUDA graph; shapes depend only on the
logits' shape and the window size."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
# Both multipliers < 2**31, so a 32-bit word times one stays below 2**63: no int64 overflow.
_MIX_C1, _MIX_C2, _SEED_K0 = 0x21F0AAAD, 0x735A2D97, 0x9E3779B9
_LOG2E = 1.0 / math.log(2.0)
_BLOCK = 64
REDO = -1  # the token of a row that the window could not draw exactly (see sample_window)


def _mix32(x: Tensor) -> Tensor:  # x: int64 holding a 32-bit word
    x = x ^ (x >> 16)
    x = (x * _MIX_C1) & _M32
    x = x ^ (x >> 15)
    x = (x * _MIX_C2) & _M32
    return x ^ (x >> 15)


def uniform(seed: Tensor, position: Tensor) -> Tensor:
    """[B] int64, [B] int64 -> [B] float32 in [0, 1), multiples of 2**-24 (exact in float32)."""
    k1 = _mix32((seed & _M32) ^ _SEED_K0)
    k2 = _mix32(((seed >> 32) & _M32) ^ k1)
    h = _mix32(position & _M32 ^ k2)
    h = _mix32(h ^ ((position >> 32) & _M32) ^ k1)
    h = _mix32(h ^ k2)
    return (h >> 8).to(torch.float32) * 2.0**-24


def scale_of(temperature: Tensor) -> Tensor:
    """log2(e) / T, so exp2((x - max) * scale) = exp((x - max) / T); 1 for greedy rows."""
    return torch.where(temperature > 0, _LOG2E / temperature.clamp_min(1e-30),
                       torch.ones_like(temperature))


def modes(x: Tensor, st):
    """(k_row, topk_on, topp_on): top-k as a count (V where off) and which filters are on."""
    v = x.shape[1]
    k = st.top_k.to(torch.int64)
    topk_on = (k > 0) & (k < v)
    k_row = torch.where(topk_on, k, torch.full_like(k, v))
    return k_row, topk_on, st.top_p < 1


def _draw(cum: Tensor, total: Tensor, u: Tensor) -> Tensor:
    """First index i with cum[i] > u * total, cum [R, W] non-decreasing, total [R] = cum[n-1]
    of the kept prefix. Capping the target just below total keeps a rounded-up u * total from
    running past the prefix onto zero-probability tokens."""
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cum, target[:, None], right=True)[:, 0]


def exp_scan(x: Tensor, scale: Tensor, u: Tensor | None, chunk_rows: int, ws=None):
    """Temperature-only rows, candidates in token-id order: (row sums of exp2((x - max) * scale)
    [R], tokens drawn at u [R] or None). The inverse CDF runs in two levels (cumsum of 64-token
    block sums, then one block's cumsum) instead of a cumsum over V; on the CPU rows go
    chunk_rows at a time through one reused buffer (ws: engine.sampler_cpu.Workspace)."""
    totals, tokens = [], []
    for r in range(0, x.shape[0], chunk_rows):
        xs = x[r:r + chunk_rows]
        out = None if ws is None else ws.get("exp", xs.shape, xs)
        e = torch.sub(xs, xs.amax(-1, keepdim=True), out=out)
        e.mul_(scale[r:r + chunk_rows, None]).exp2_()
        cum = _block_sums(e).cumsum(-1)  # [r, V / 64]
        totals.append(cum[:, -1])
        if u is not None:
            tokens.append(_draw_blocks(e, cum, u[r:r + chunk_rows]))
    cat = (lambda ts: ts[0]) if len(totals) == 1 else torch.cat
    return cat(totals), (cat(tokens) if u is not None else None)


def _block_sums(e: Tensor) -> Tensor:
    v = e.shape[1]
    nb = v // _BLOCK
    parts = [e[:, :nb * _BLOCK].unflatten(1, (nb, _BLOCK)).sum(-1)] if nb else []
    if v % _BLOCK:
        parts.append(e[:, nb * _BLOCK:].sum(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


def _draw_blocks(e: Tensor, cum: Tensor, u: Tensor) -> Tensor:
    """The token at u from e [R, V] >= 0 and its cumulative block sums cum [R, NB]."""
    v = e.shape[1]
    total = cum[:, -1]
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))[:, None]
    b = torch.searchsorted(cum, target, right=True).clamp_(max=cum.shape[1] - 1)  # [R, 1]
    base = torch.where(b > 0, cum.gather(1, (b - 1).clamp_(min=0)), 0.0)
    lane = torch.arange(_BLOCK, device=e.device)
    cols = b * _BLOCK + lane  # [R, 64]
    eb = e.gather(1, cols.clamp(max=v - 1)) * (cols < v)
    j = torch.searchsorted(base + eb.cumsum(-1), target, right=True)
    # Rounding can leave the block's last cumulative below the target: take its last live token.
    last = torch.where(eb > 0, lane, 0).amax(-1, keepdim=True)
    return cols.gather(1, torch.minimum(j, last))[:, 0]


def prefix_exp(vals: Tensor, scale: Tensor) -> Tensor:
    """exp2((vals - row max) * scale) of candidates in draw order (vals [R, W], max first)."""
    return (vals - vals[:, :1]).mul_(scale[:, None]).exp2_()


def filter_draw(cum, idx, k_row, topk_on, top_p, topp_on, z_full, u, any_top_p):
    """Rows with top-k or top-p, from the cumulative weights cum [R, W] of their first W
    candidates in draw order (ids idx [R, W]). Returns (token ids, j: the token's index in the
    window, short: top-p rows without top-k whose first W candidates hold less than top_p of
    the mass, so their cut lies past the window)."""
    w = cum.shape[1]
    kk = k_row.clamp(max=w)
    n = torch.where(topk_on, kk, torch.full_like(kk, w))
    z = torch.where(topk_on, cum.gather(1, (kk - 1)[:, None])[:, 0], z_full)
    short = torch.zeros_like(topk_on)
    if any_top_p:
        cut = torch.searchsorted(cum, (top_p * z)[:, None])[:, 0]  # first cum >= top_p * z
        # top-p without top-k: k_row is V, so the cut is missing only from a partial window.
        short = topp_on & ~topk_on & (cut >= w) & (k_row > w)
        n = torch.where(topp_on, torch.minimum(cut + 1, n), n)
    j = _draw(cum, cum.gather(1, (n - 1)[:, None])[:, 0], u)
    return idx.gather(1, j[:, None])[:, 0], j, short


def order_keys(vals: Tensor, ids: Tensor, v: int) -> Tensor:
    """Unique int64 per token, ordered as (value, -id): an order-preserving integer of the
    float32 (-0.0 and +0.0 equal) in the high 32 bits, V - 1 - id in the low."""
    bits = vals.view(torch.int32)
    key = torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits).to(torch.int64) * 2**32
    return key.add_((v - 1) - ids)


def _common(x: Tensor, st, any_top_p: bool):
    """What both device paths compute for every row: the filters, scale, u, the row sums and
    the token of each row without top-k / top-p (greedy or temperature only)."""
    k_row, topk_on, topp_on = modes(x, st)
    if not any_top_p:
        topp_on = torch.zeros_like(topp_on)
    scale, u = scale_of(st.temperature), uniform(st.seed, st.position)
    z_full, tok_plain = exp_scan(x, scale, u, x.shape[0])
    sampled = st.temperature > 0
    plain = torch.where(sampled, tok_plain, x.argmax(-1))
    return k_row, topk_on, topp_on, scale, u, z_full, plain, sampled & (topk_on | topp_on)


def sample_sorted(x: Tensor, st, any_top_p: bool) -> Tensor:
    """Every row through one full stable sort of its logits: exact for any parameters."""
    k_row, topk_on, topp_on, scale, u, z_full, plain, filtered = _common(x, st, any_top_p)
    # + 0.0 turns -0.0 into +0.0, so a radix sort cannot order the two zeros apart.
    vals, idx = torch.sort(x + 0.0, dim=-1, descending=True, stable=True)
    cum = prefix_exp(vals, scale).cumsum(-1)
    tok, _, _ = filter_draw(cum, idx, k_row, topk_on, st.top_p, topp_on, z_full, u, any_top_p)
    return torch.where(filtered, tok, plain)


def top_window(x: Tensor, w: int) -> tuple[Tensor, Tensor, Tensor]:
    """The w largest logits of each row in draw order (value descending, ties by ascending id):
    (vals [R, w], ids [R, w], exact [R]). torch.topk may pick any of the tokens that tie with
    the w-th value and returns them in any order; one sort of w unique int64 keys fixes the
    order, and `exact` counts the leading entries whose ids are certain: every token above the
    smallest value taken is in the window, but those equal to it may be others than the
    lowest-id ones (all w when the window is the whole row)."""
    v = x.shape[1]
    vals, idx = x.topk(w, dim=-1, sorted=False)
    order = order_keys(vals, idx, v).argsort(dim=-1, descending=True)
    vals, idx = vals.gather(1, order), idx.gather(1, order)
    if w == v:
        return vals, idx, torch.full_like(idx[:, 0], w)
    return vals, idx, (vals > vals[:, -1:]).sum(-1)


def sample_window(x: Tensor, st, any_top_p: bool, window: int) -> Tensor:
    """Tokens [B]: every row as sample_sorted draws it, without sorting the vocabulary; rows
    with top-k or top-p draw from their first min(window, V) candidates (top_window). A row
    gets REDO instead when that window cannot decide its token exactly:
      - its top-k is larger than the window, or it has top-p without top-k and the window
        holds less than top_p of its mass (the candidates past the window would count),
      - unless every candidate past the window has probability exactly 0 (-inf logits or
        exp2 underflow in float32: they add nothing to any sum or draw);
      - or u lands on a token that ties with the window's smallest value (j >= exact): which
        of the tied tokens come first depends on ids outside the window.
    window 0 skips the window: every top-k / top-p row gets REDO (callers pass 0 only when the
    step has none). Sampler.finish re-draws REDO rows with sample_sorted."""
    k_row, topk_on, topp_on, scale, u, z_full, plain, filtered = _common(x, st, any_top_p)
    if window == 0:
        return torch.where(filtered, REDO, plain)
    w = min(window, x.shape[1])
    vals, idx, exact = top_window(x, w)
    e = prefix_exp(vals, scale)  # [B, w]
    tok, j, short = filter_draw(e.cumsum(-1), idx, k_row, topk_on, st.top_p, topp_on, z_full,
                                u, any_top_p)
    beyond = short | (topk_on & (k_row > w))
    redo = (beyond & (e[:, -1] > 0)) | (j >= exact)
    return torch.where(filtered, torch.where(redo, REDO, tok), plain)
