"""The oracle: plain NumPy/PyTorch statements of everything the C++/CUDA core computes.

Nothing here is fast; everything here is meant to be read. Tests compare every op on every device
against these functions. Where an op promises bit-exact output (projections, reinit, rebuild), the
reference repeats the op's rounding order so the comparison can be exact.
"""

from __future__ import annotations

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Projections (docs/design.md §2): Philox4x32-10 -> Box-Muller with deterministic log/sincos
# -> blocked Householder QR (panel 32) in float64 -> float32.
# --------------------------------------------------------------------------------------------

QR_PANEL = 32
_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """ctr: [N, 4] uint32 counters -> [N, 4] uint32 outputs."""
    c = [ctr[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    mask = np.uint64(0xFFFFFFFF)
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0 = np.uint64(_M0) * c[0]
        p1 = np.uint64(_M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return np.stack(c, axis=1).astype(np.uint32)


def det_log(x: np.ndarray) -> np.ndarray:
    """log(x) for x in (0, 1], with only correctly-rounded operations (see cpp det_math.h)."""
    m, e = np.frexp(x)
    small = m < 0.70710678118654752440
    m = np.where(small, m * 2.0, m)
    e = np.where(small, e - 1, e).astype(np.float64)
    f = m - 1.0
    s = f / (2.0 + f)
    s2 = s * s
    p = np.full_like(s, 1.0 / 23.0)
    for d in (21, 19, 17, 15, 13, 11, 9, 7, 5, 3):
        p = p * s2 + 1.0 / d
    p = p * s2 + 1.0
    return e * 6.93147180369123816490e-01 + (e * 1.90821492927058770002e-10 + 2.0 * s * p)


def _sincos_small(a):
    a2 = a * a
    s = np.full_like(a, 1.0 / 355687428096000.0)
    for fac in (1307674368000.0, 6227020800.0, 39916800.0, 362880.0, 5040.0, 120.0, 6.0):
        s = s * -a2 + 1.0 / fac
    s = s * -a2 + 1.0
    c = np.full_like(a, 1.0 / 6402373705728000.0)
    for fac in (20922789888000.0, 87178291200.0, 479001600.0, 3628800.0, 40320.0, 720.0, 24.0):
        c = c * -a2 + 1.0 / fac
    c = c * -a2 + 0.5
    c = c * -a2 + 1.0
    return a * s, c


def det_sincos_2pi(u: np.ndarray):
    """(sin, cos) of 2*pi*u for u in [0, 1)."""
    v = u * 4.0
    q = v.astype(np.int64)
    f = v - q
    half_pi = 1.57079632679489661923
    s_lo, c_lo = _sincos_small(np.where(f <= 0.5, f, 0.0) * half_pi)
    s_hi, c_hi = _sincos_small(np.where(f <= 0.5, 0.0, 1.0 - f) * half_pi)
    s = np.where(f <= 0.5, s_lo, c_hi)
    c = np.where(f <= 0.5, c_lo, s_hi)
    q &= 3
    sin = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    cos = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    return sin, cos


def philox_normals(seed: int, stream: int, count: int) -> np.ndarray:
    """The first `count` standard normals of a stream: pair m -> elements 2m, 2m+1."""
    pairs = (count + 1) // 2
    m = np.arange(pairs, dtype=np.uint64)
    ctr = np.stack([m & np.uint64(0xFFFFFFFF), m >> np.uint64(32),
                    np.full_like(m, stream), np.zeros_like(m)], axis=1).astype(np.uint32)
    w = philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32)).astype(np.uint64)

    def res53(hi, lo):
        return ((hi >> np.uint64(5)) * np.uint64(67108864) + (lo >> np.uint64(6))).astype(
            np.float64) * (1.0 / 9007199254740992.0)

    u1 = 1.0 - res53(w[:, 0], w[:, 1])
    u2 = res53(w[:, 2], w[:, 3])
    radius = np.sqrt(-2.0 * det_log(u1))
    sin, cos = det_sincos_2pi(u2)
    return np.stack([radius * cos, radius * sin], axis=1).reshape(-1)[:count]


def _lane_dot(a, b):
    """a . b in the C++ lane order: 8 lanes (i mod 8) summed in increasing i over the first
    8*floor(n/8) elements, combined ((0+1)+(2+3))+((4+5)+(6+7)), then the tail in order.
    (numpy's own sum is pairwise, so the lanes accumulate explicitly.)"""
    prod = a * b
    full = len(prod) - len(prod) % 8
    lane = np.zeros(8)
    if full:
        lane = np.add.accumulate(prod[:full].reshape(-1, 8), axis=0)[-1]
    s = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]))
    for v in prod[full:]:
        s = s + v
    return float(s)


def householder_thin_q(g: np.ndarray) -> np.ndarray:
    """Q of the thin QR of g (n x r) with diag(R) > 0, in the exact rounding order of the C++
    code."""
    n, r = g.shape
    a = np.array(g, dtype=np.float64, order="F")
    taus, betas, blocks = np.zeros(r), np.zeros(r), []
    for k0 in range(0, r, QR_PANEL):
        nb = min(QR_PANEL, r - k0)
        for k in range(k0, k0 + nb):  # unblocked panel factorization
            x = a[k:, k]
            alpha, sigma = x[0], _lane_dot(x[1:], x[1:])
            if sigma == 0.0:
                taus[k], betas[k] = 0.0, alpha
                continue
            norm = np.sqrt(alpha * alpha + sigma)
            beta = -norm if alpha >= 0.0 else norm
            x[1:] = x[1:] * (1.0 / (alpha - beta))
            taus[k], betas[k] = (beta - alpha) / beta, beta
            for j in range(k + 1, k0 + nb):
                cj = a[k:, j]
                w = cj[0] + _lane_dot(x[1:], cj[1:])
                tw = taus[k] * w
                cj[0] = cj[0] - tw
                cj[1:] = cj[1:] - x[1:] * tw
        m = n - k0
        v = np.zeros((m, nb))
        for p in range(nb):
            v[p, p] = 1.0
            v[p + 1:, p] = a[k0 + p + 1:, k0 + p]
        t = np.zeros((nb, nb))
        for p in range(nb):
            y = [_lane_dot(v[:, q], v[:, p]) for q in range(p)]
            for q in range(p):
                s = 0.0
                for u in range(q, p):
                    s += t[q, u] * y[u]
                t[q, p] = -taus[k0 + p] * s
            t[p, p] = taus[k0 + p]
        blocks.append((k0, v, t))
        if k0 + nb < r:
            a[k0:, k0 + nb:] = _apply_block(v, t, a[k0:, k0 + nb:], transpose=True)
    q = np.zeros((n, r), order="F")
    q[np.arange(r), np.arange(r)] = 1.0
    for k0, v, t in reversed(blocks):
        q[k0:, k0:] = _apply_block(v, t, q[k0:, k0:], transpose=False)
    return q * np.where(betas < 0.0, -1.0, 1.0)


def _apply_block(v, t, c, transpose):
    """(I - v T v^T) c, or with T^T, with every sum in the C++ order (rows, then q, then p)."""
    m, nb = v.shape
    w = np.zeros((nb, c.shape[1]))
    for i in range(m):
        w = w + np.outer(v[i], c[i])
    tw = np.zeros_like(w)
    for p in range(nb):
        s = np.zeros(c.shape[1])
        for q in (range(0, p + 1) if transpose else range(p, nb)):
            s = s + (t[q, p] if transpose else t[p, q]) * w[q]
        tw[p] = s
    acc = np.outer(v[:, 0], tw[0])
    for p in range(1, nb):
        acc = acc + np.outer(v[:, p], tw[p])
    return c - acc


def projection_factor(seed: int, stream: int, n: int, r: int, transposed: bool) -> np.ndarray:
    """float32 factor exactly as uora::projection_factor."""
    g = philox_normals(seed, stream, n * r).reshape(n, r)
    q = householder_thin_q(g).astype(np.float32)
    return np.ascontiguousarray(q.T if transposed else q)


# --------------------------------------------------------------------------------------------
# Training-side math (docs/design.md §1)
# --------------------------------------------------------------------------------------------


def uora_linear(x, weight, bias, a, b, lambda_b, lambda_d):
    """y = x W^T + bias + lambda_b * (B[:out] (lambda_d * (A[:, :in] x))), adapter math in float32.

    x: [..., in]; weight: [out, in]; a: [r, max_in]; b: [max_out, r]; lambda_b: [out]; lambda_d: [r]
    """
    out_f, in_f = weight.shape
    y = torch.nn.functional.linear(x, weight, bias)
    h = torch.nn.functional.linear(x.float(), a[:, :in_f].float()) * lambda_d.float()
    d = torch.nn.functional.linear(h, b[:out_f, :].float()) * lambda_b.float()
    return y + d.to(y.dtype)


def rebuild_projections(a0, qa, b0, qb, p):
    """A = p*A0 + (1-p)*QA row-wise, B likewise column-wise, float32, one rounding per operation."""
    p = p.float()
    a = p[:, None] * a0 + (1.0 - p)[:, None] * qa
    b = p[None, :] * b0 + (1.0 - p)[None, :] * qb
    return a, b


def reinit_literal(lambda_ds, counters, a, b, qa, qb, tau, k, alpha):
    """The published rule, literally: per layer, per index, in order, interpolating in place.

    lambda_ds: list of [r] tensors; counters: list of [r] int tensors (mutated); a, b mutated.
    Returns the number of events fired.
    """
    events = 0
    r = a.shape[0]
    for layer, lam in enumerate(lambda_ds):
        for i in range(r):
            if abs(float(lam[i])) < tau:
                counters[layer][i] += 1
                if int(counters[layer][i]) % k == 0:
                    a[i, :] = alpha * a[i, :] + (1 - alpha) * qa[i, :]
                    b[:, i] = alpha * b[:, i] + (1 - alpha) * qb[:, i]
                    events += 1
    return events


# --------------------------------------------------------------------------------------------
# Serving: the multi-adapter group delta (docs/design.md §4), per token, from the rebuilt A and B
# --------------------------------------------------------------------------------------------


def uora_group(y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, lambda_b_offsets,
               y_offsets, outs, with_q):
    """Returns y plus every row's adapter delta (float32 math, one rounding to y's dtype).

    Deliberately not the kernels' identity: each row rebuilds its adapter's A and B from p and
    applies them directly, as a single-adapter VeRA/UORA layer would.
    """
    y = y.clone()
    r, in_f = lambda_d.shape[2], x.shape[1]
    for t in range(x.shape[0]):
        s = int(slot[t])
        if s < 0:
            continue
        for j, m in enumerate(modules):
            out, off, yoff = outs[j], lambda_b_offsets[j], y_offsets[j]
            if with_q:
                a = p[s, :, None] * a_cat[:r, :in_f] + (1 - p[s, :, None]) * a_cat[r:2 * r, :in_f]
                b = p[s] * b_cat[:out, :r] + (1 - p[s]) * b_cat[:out, r:2 * r]
            else:
                a, b = a_cat[:r, :in_f], b_cat[:out, :r]
            d = lambda_b[s, off:off + out] * (b @ (lambda_d[s, m] * (a @ x[t].float())))
            y[t, yoff:yoff + out] = (y[t, yoff:yoff + out].float() + d).to(y.dtype)
    return y


# --------------------------------------------------------------------------------------------
# PEFT VeRA's projections (algorithm "peft-vera-kaiming-mt19937"): MT19937 -> 24-bit uniforms
# -> Kaiming-uniform, A [r, max_in] then B [max_out, r] from one stream.
# --------------------------------------------------------------------------------------------

_MT_N, _MT_M = 624, 397


def mt19937_init(seed: int) -> np.ndarray:
    """init_genrand: the 624-word state from the low 32 bits of `seed` (all that torch keeps)."""
    state = np.zeros(_MT_N, dtype=np.uint64)
    state[0] = seed & 0xFFFFFFFF
    for j in range(1, _MT_N):
        prev = int(state[j - 1])
        state[j] = (1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF
    return state


def mt19937_twist(state: np.ndarray) -> np.ndarray:
    """The next 624-word state. Word i reads words i+1 and i+397 (mod 624) as the serial loop
    leaves them, so it is computed in the chunks [0,227) [227,454) [454,623) [623] in which every
    word read is either untouched or already final."""
    s = state.copy()
    upper, lower, mag = np.uint64(0x80000000), np.uint64(0x7FFFFFFF), np.uint64(0x9908B0DF)
    for lo, hi in ((0, 227), (227, 454), (454, 623), (623, 624)):
        i = np.arange(lo, hi)
        y = (s[i] & upper) | (s[(i + 1) % _MT_N] & lower)
        s[i] = s[(i + _MT_M) % _MT_N] ^ (y >> np.uint64(1)) ^ np.where(y & np.uint64(1), mag,
                                                                        np.uint64(0))
    return s


def mt19937_temper(y: np.ndarray) -> np.ndarray:
    y = y ^ (y >> np.uint64(11))
    y = y ^ ((y << np.uint64(7)) & np.uint64(0x9D2C5680))
    y = y ^ ((y << np.uint64(15)) & np.uint64(0xEFC60000))
    y = y ^ (y >> np.uint64(18))
    return (y & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def mt19937_outputs(seed: int, count: int) -> np.ndarray:
    """The first `count` 32-bit outputs of MT19937 seeded with init_genrand(seed & 0xFFFFFFFF)."""
    state, out = mt19937_init(seed), []
    for _ in range((count + _MT_N - 1) // _MT_N):
        state = mt19937_twist(state)
        out.append(mt19937_temper(state))
    return np.concatenate(out)[:count] if out else np.zeros(0, dtype=np.uint32)


def kaiming_uniform(words: np.ndarray, fan_in: int) -> np.ndarray:
    """torch's float32 uniform_(-bound, bound) from 32-bit words; bound as PEFT's _kaiming_init."""
    bound = np.sqrt(3.0) * (np.sqrt(2.0) / np.sqrt(float(fan_in)))  # float64, PEFT's order
    lo, hi = np.float32(-bound), np.float32(bound)
    x = (words & np.uint32(0xFFFFFF)).astype(np.float64) * 2.0**-24
    # Exact in float64 (24-bit x times 24-bit span), so the one cast is the single rounding that
    # torch's fused multiply-add performs.
    return (x * np.float64(hi - lo) + np.float64(lo)).astype(np.float32)


def vera_kaiming_factors(seed: int, r: int, max_in: int, max_out: int):
    """float32 (A [r, max_in], B [max_out, r]) exactly as uora::vera_kaiming_factors."""
    words = mt19937_outputs(seed, r * max_in + max_out * r)
    a = kaiming_uniform(words[: r * max_in], max_in).reshape(r, max_in)
    b = kaiming_uniform(words[r * max_in:], r).reshape(max_out, r)
    return a, b


# --------------------------------------------------------------------------------------------
# Sampling (engine/sampler.py): greedy, temperature, top-k, top-p; one uniform per draw from a
# counter-based hash of (seed, position); the token is the inverse CDF of the candidates at u.
# --------------------------------------------------------------------------------------------

_SAMPLE_C1, _SAMPLE_C2, _SAMPLE_K0 = 0x21F0AAAD, 0x735A2D97, 0x9E3779B9


def sample_mix32(x: int) -> int:
    """hash-prospector's 2-round xorshift-multiply [16 21f0aaad 15 735a2d97 15]: a bijection of
    32-bit words."""
    x ^= x >> 16
    x = (x * _SAMPLE_C1) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * _SAMPLE_C2) & 0xFFFFFFFF
    return x ^ (x >> 15)


def sample_uniform(seed: int, position: int) -> float:
    """u in [0, 1), a multiple of 2**-24, from the 32-bit words of seed and position. Position
    enters first and the seed's words are mixed in again after it, so two seeds' streams are not
    shifted copies of each other."""
    s_lo, s_hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    p_lo, p_hi = position & 0xFFFFFFFF, (position >> 32) & 0xFFFFFFFF
    k1 = sample_mix32(s_lo ^ _SAMPLE_K0)  # the constant keeps seed 0 off mix32's fixed point 0
    k2 = sample_mix32(s_hi ^ k1)
    h = sample_mix32(p_lo ^ k2)
    h = sample_mix32(h ^ p_hi ^ k1)
    h = sample_mix32(h ^ k2)
    return (h >> 8) / 2**24


def sample_candidates(logits_row, temperature: float, top_k: int, top_p: float):
    """For temperature > 0: (ids, q, cum_k): the candidate ids in draw order, their probabilities
    renormalized over the candidates (float64), and the cumulative probability over the top-k set
    that decided the top-p cut (None without top-p)."""
    x = logits_row.double().tolist()
    v = len(x)
    prob = torch.softmax(torch.tensor(x, dtype=torch.float64) / temperature, 0).tolist()
    topk_on, topp_on = 0 < top_k < v, top_p < 1
    if not (topk_on or topp_on):
        return list(range(v)), prob, None  # token-id order: no sort
    ids = sorted(range(v), key=lambda i: (-x[i], i))  # descending logit = descending prob
    if topk_on:
        ids = ids[:top_k]
    mass = sum(prob[i] for i in ids)
    q = [prob[i] / mass for i in ids]
    cum_k = None
    if topp_on:
        cum_k = list(np.cumsum(q))
        n = next((i + 1 for i, c in enumerate(cum_k) if c >= top_p), len(ids))  # crossing kept
        ids, q = ids[:n], q[:n]
        mass = sum(q)
        q = [p / mass for p in q]
    return ids, q, cum_k


def sample_row(logits_row, temperature: float, top_k: int, top_p: float, seed: int,
               position: int) -> int:
    """The token drawn for one row: logits_row [V] float32, parameters as plain Python values."""
    if temperature == 0:
        return int(torch.argmax(logits_row))  # lowest id on ties
    ids, q, _ = sample_candidates(logits_row, temperature, top_k, top_p)
    u = sample_uniform(seed, position)
    cdf = np.cumsum(q)
    for i, c in zip(ids, cdf):
        if c > u:
            return i
    return [i for i, p in zip(ids, q) if p > 0][-1]  # cdf[-1] rounded below u: the last live one


# --------------------------------------------------------------------------------------------
# Paged attention (uora::paged_attention_): one layer's KV cache in pages of block_size
# positions; each sequence's block table lists its pages in position order.
# --------------------------------------------------------------------------------------------


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start, scale: float):
    """out [T, nH, hd] in q's dtype: causal GQA attention of each sequence's query rows.

    q [T, nH, hd]; k_cache, v_cache [num_blocks, block_size, nKV, hd]; block_tables [B, max_blocks],
    seq_lens [B], query_start [B + 1] int32. Sequence b owns rows query_start[b] : query_start[b+1]:
    its last q_len positions, whose K/V are already in the cache. Rows past query_start[B]: zeros.
    """
    T, n_heads, hd = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    out = torch.zeros(T, n_heads, hd, dtype=torch.float32)
    for b in range(block_tables.shape[0]):
        r0, r1 = int(query_start[b]), int(query_start[b + 1])
        ctx, q_len = int(seq_lens[b]), r1 - r0
        if q_len == 0:
            continue
        pos = torch.arange(ctx)
        pages = block_tables[b, pos // block_size].long()
        # [ctx, nH, hd]
        k = k_cache[pages, pos % block_size].float().repeat_interleave(group, dim=1)
        v = v_cache[pages, pos % block_size].float().repeat_interleave(group, dim=1)
        scores = scale * torch.einsum("qhd,khd->hqk", q[r0:r1].float(), k)  # [nH, q_len, ctx]
        q_pos = ctx - q_len + torch.arange(q_len)  # absolute position of each query row
        allowed = pos[None, :] <= q_pos[:, None]  # [q_len, ctx]
        p = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        out[r0:r1] = torch.einsum("hqk,khd->qhd", p, v)
    return out.to(q.dtype)


# --------------------------------------------------------------------------------------------
# OpenAI logit processors (uora::process_logits_, uora::record_tokens_): per-request tables
# (engine/processors.py) applied to a step's sampled logits, one row at a time.
# --------------------------------------------------------------------------------------------


def process_logits(logits, rows, slots, lens, pos, scal, min_tokens, stops, bias_tok, bias_val,
                   hist, pen):
    """A processed copy of logits [R, V] float32 (arguments as ops.process_logits_)."""
    out = logits.clone()
    for p in range(rows.numel()):
        x, s, n = out[int(rows[p])], int(slots[p]), int(lens[p])
        if int(pos[p]) < int(min_tokens[s]):
            x[stops[s]] = float("-inf")
        for t, b in zip(bias_tok[s].tolist(), bias_val[s]):
            x[t] = x[t] + b
        rep, freq, pres = scal[s]
        if rep != 1 or freq != 0 or pres != 0:
            ids = hist[s, :n]
            v = x[ids]
            x[ids] = torch.where(v > 0, v / rep, v * rep) - pen[s, :n]
    return out


def record_tokens(hist, pen, tokens, rows, slots, lens, pos, scal):
    """(hist, pen) after a step's draw tokens [R] (arguments as ops.record_tokens_)."""
    hist, pen = hist.clone(), pen.clone()
    for p in range(rows.numel()):
        s, end, t = int(slots[p]), int(lens[p]), int(tokens[int(rows[p])])
        hist[s, end] = t
        freq, pres = scal[s, 1], scal[s, 2]
        if freq != 0 or pres != 0:
            count = int((hist[s, end - int(pos[p]):end + 1] == t).sum())
            same = hist[s, :end + 1] == t
            pen[s, :end + 1][same] = freq * torch.tensor(float(count)) + pres
    return hist, pen
