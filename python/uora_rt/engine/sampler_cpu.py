"""The sampler's CPU path (engine.sampler holds the Semantics and the API): rows grouped on the
host (greedy / temperature only / top-k or top-p), each group vectorized. Top-k and top-p rows
draw from a window of their first w candidates (w = top_k, or 64 growing x4 while a top-p
row's window holds less than p of the mass), found by a two-level top-k (block maxima, then the
best blocks' tokens) whose ties are redone exactly; so the vocabulary is never sorted, except
that a top-p prefix longer than a quarter of V (a nearly flat distribution) ends in a window of
the whole row. Reads values on the host, so it is not for CUDA graphs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from uora_rt.engine.sampler_ops import (exp_scan, filter_draw, modes, order_keys, prefix_exp,
                                        scale_of, uniform)

_WINDOW0, _GROW = 64, 4
_CHUNK = 1 << 21  # elements per CPU pass (8 MB of float32)


class Workspace:
    """Buffers reused across calls: on the CPU a fresh multi-MB tensor per call costs page
    faults that can exceed the arithmetic done in it."""

    def __init__(self):
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, shape, like: Tensor) -> Tensor:
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


def _filtered(vals, idx, scale, k_row, topk_on, top_p, topp_on, z_full, u, any_top_p):
    """Rows with top-k or top-p from their first W candidates in draw order (vals/idx [R, W]).
    Returns (token ids, short): short rows (top-p without top-k) need a larger window because
    their first W candidates hold less than top_p of the mass."""
    tok, _, short = filter_draw(prefix_exp(vals, scale).cumsum(-1), idx, k_row, topk_on, top_p,
                                topp_on, z_full, u, any_top_p)
    return tok, short


def _rows(x: Tensor, ids: Tensor) -> Tensor:
    return x if ids.numel() == x.shape[0] else x.index_select(0, ids)


def sample_cpu(x: Tensor, st, any_top_p: bool, ws: Workspace) -> Tensor:
    """Tokens [B] (st: engine.sampler.SamplingTensors); the vocabulary is never sorted."""
    b, v = x.shape
    chunk = max(1, _CHUNK // v)
    k_row, topk_on, topp_on = modes(x, st)
    if not any_top_p:
        topp_on = torch.zeros_like(topp_on)
    sampled = st.temperature > 0
    filtered = sampled & (topk_on | topp_on)
    out = torch.empty(b, dtype=torch.int64, device=x.device)
    greedy_ids = (~sampled).nonzero()[:, 0]
    if greedy_ids.numel():
        out[greedy_ids] = _rows(x, greedy_ids).argmax(-1)
    if greedy_ids.numel() == b:
        return out
    scale, u = scale_of(st.temperature), uniform(st.seed, st.position)
    plain_ids = (sampled & ~filtered).nonzero()[:, 0]
    if plain_ids.numel():
        out[plain_ids] = exp_scan(_rows(x, plain_ids), scale[plain_ids], u[plain_ids], chunk,
                                  ws)[1]
    ids = filtered.nonzero()[:, 0]
    if ids.numel() == 0:
        return out
    xf = _rows(x, ids)
    kr, tk, tp = k_row[ids], topk_on[ids], topp_on[ids]
    sf, uf, pf = scale[ids], u[ids], st.top_p[ids]
    z_full = torch.zeros(ids.numel(), dtype=torch.float32, device=x.device)
    need = (tp & ~tk).nonzero()[:, 0]  # top-p over the whole vocabulary: its normalizer
    if need.numel():
        z_full[need] = exp_scan(_rows(xf, need), sf[need], None, chunk, ws)[0]
    pending = torch.arange(ids.numel(), device=x.device)
    w_topp = _WINDOW0
    while pending.numel():
        want = torch.where(tk[pending], kr[pending], torch.full_like(kr[pending], w_topp))
        w = min(v, int(want.max()))
        vals, idx = _window(_rows(xf, pending), w, ws)
        tok, short = _filtered(vals, idx, sf[pending], kr[pending], tk[pending], pf[pending],
                               tp[pending], z_full[pending], uf[pending], any_top_p)
        done = ~short
        out[ids[pending[done]]] = tok[done]
        pending = pending[short]
        w_topp = max(w_topp, w) * _GROW
    return out


def _window(x: Tensor, w: int, ws) -> tuple[Tensor, Tensor]:
    """The first w ids of each row in draw order (descending value, ties by ascending id) and
    their values. topk leaves the order of equal values open, so rows where the w + 1 largest
    hold a tie are redone on unique int64 keys (value, then id). Ties among -inf (masked) tokens
    are left in topk's order: they carry no probability, so they can never be drawn."""
    v = x.shape[1]
    k = min(w + 1, v)
    g = _group(v, k)
    bmax = _block_max(x, g) if g > 1 else None
    vals, idx = _topk_blocks(x, bmax, k, ws) if g > 1 else x.topk(k, dim=-1)
    tied = ((vals[:, 1:] == vals[:, :-1]) & (vals[:, 1:] > -math.inf)).any(-1).nonzero()[:, 0]
    if tied.numel():
        xt = x.index_select(0, tied)
        if g > 1:  # every block whose max reaches the k-th block max: a superset of the top k
            bm = bmax.index_select(0, tied)
            m = bm.topk(k, dim=-1).values[:, -1:]
            ids = _block_ids(bm.topk(int((bm >= m).sum(-1).max()), dim=-1).indices, g, v)
        else:
            ids = torch.arange(v, device=x.device).expand(tied.numel(), v)
        keys = order_keys(xt.gather(1, ids), ids, v)
        idx_t = ids.gather(1, keys.topk(k, dim=-1).indices)
        vals[tied], idx[tied] = xt.gather(1, idx_t), idx_t
    return vals[:, :w], idx[:, :w]


# Two-level top-k. Block b of a row holds the g tokens b, b + n, b + 2n, ... (n = V // g): a
# strided partition, so the block maxima are g - 1 vectorized elementwise maxima of contiguous
# slices. The V - g n tokens past the blocks belong to no block and are always candidates.


def _block_max(x: Tensor, g: int) -> Tensor:
    n = x.shape[1] // g
    return x[:, :g * n].unflatten(1, (g, n)).amax(1)  # [R, n]


def _block_ids(bi: Tensor, g: int, v: int) -> Tensor:
    """Token ids of blocks bi [R, c], then the tokens past the blocks: [R, c g + V % g]."""
    n = v // g
    ids = (bi[:, None, :] + n * torch.arange(g, device=bi.device)[:, None]).flatten(1)
    if v % g:
        ids = torch.cat([ids, torch.arange(g * n, v, device=bi.device).expand(bi.shape[0], -1)], 1)
    return ids


def _topk_blocks(x: Tensor, bmax: Tensor, k: int, ws) -> tuple[Tensor, Tensor]:
    """The k largest of each row in two levels: the k largest block maxima, then the k largest
    of those k blocks' tokens (torch.topk costs O(V) per row; this reads V once and selects from
    V / g and k g). Exact unless values tie: if a true top-(k-1) token t is left out, its
    block's max equals the smallest chosen maximum m, at most k - 2 tokens exceed m, so two
    chosen maxima equal m and show as equal neighbours among the k values, which _window checks
    (the same holds for a tie across the boundary at k - 1)."""
    r, v = x.shape
    n = bmax.shape[1]
    g = v // n
    bi = bmax.topk(k, dim=-1).indices  # [R, k]
    blocks = x[:, :g * n].unflatten(1, (g, n))
    cand = torch.gather(blocks, 2, bi[:, None, :].expand(r, g, k),
                        out=ws.get("cand", (r, g, k), x)).flatten(1)  # [R, g k]
    if v % g:
        cand = torch.cat([cand, x[:, g * n:]], 1)
    vals, pos = cand.topk(k, dim=-1)
    lane, slot = pos // k, pos % k  # lane within the block, slot among the chosen blocks
    idx = bi.gather(1, slot.clamp(max=k - 1)) + n * lane
    return vals, idx if v % g == 0 else torch.where(pos < g * k, idx, pos - g * k + g * n)


def _group(v: int, k: int) -> int:
    """Block size for _topk_blocks: the power of two nearest sqrt(V / k) in [2, 64], so both
    selections are about sqrt(V k) long, or 1 (plain topk) when the k blocks would hold more
    than a quarter of the row. On SmolLM2 logits (V 49152, 2 threads) this is 1.5-2.5x faster
    than torch.topk for k 18 to 1025 and slower for k 4097 (plain topk there)."""
    g = 1 << min(6, max(1, round(math.log2(max(1.0, v / k)) / 2)))
    return g if 4 * k * g <= v else 1
