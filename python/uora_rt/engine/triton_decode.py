"""Paged decode attention for CUDA in Triton: one query token per sequence, keys and values
read in place through the block table (flash-decoding: the context is split into chunks that
run in parallel, then merged).

Grid (sequence, KV head, split). A program loads the query heads that share its KV head
(padded to 16 rows for tensor-core dots), walks its chunk of the context BLOCK_N tokens at a
time with an online softmax in float32, and writes either the final output (one split) or its
partial (normalized output, max, sum) for `_merge`. Splits beyond a sequence's length exit at
once, so the grid can be fixed for a CUDA graph while lengths change.

Semantics: reference.paged_attention with one query per sequence (query_start = 0, 1, ..., B).
Triton is optional: `available()` says whether this path can run.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU wheel of torch brings no Triton
    triton = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _decode(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                scale, stride_bt, n_heads, n_kv, group, block_size, split_tokens, n_splits,
                HEAD_DIM: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.program_id(2)
        length = tl.load(lens_ptr + b)
        start = s * split_tokens
        rows = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HD)
        hmask = rows < group
        dmask = d < HEAD_DIM
        heads = g * group + rows
        if start < length:
            end = tl.minimum(start + split_tokens, length)
            q = tl.load(q_ptr + (b * n_heads + heads)[:, None] * HEAD_DIM + d[None, :],
                        mask=hmask[:, None] & dmask[None, :], other=0.0)
            m = tl.full([BLOCK_G], float("-inf"), tl.float32)
            l_sum = tl.zeros([BLOCK_G], tl.float32)
            acc = tl.zeros([BLOCK_G, HD], tl.float32)
            for t0 in range(start, end, BLOCK_N):
                t = t0 + tl.arange(0, BLOCK_N)
                tmask = t < end
                blk = tl.load(bt_ptr + b * stride_bt + t // block_size, mask=tmask, other=0)
                slot = blk.to(tl.int64) * block_size + t % block_size
                off = (slot * n_kv + g)[:, None] * HEAD_DIM + d[None, :]
                kv_mask = tmask[:, None] & dmask[None, :]
                k = tl.load(k_ptr + off, mask=kv_mask, other=0.0)
                if IEEE:
                    sc = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    sc = tl.dot(q, tl.trans(k))
                sc = tl.where(tmask[None, :], sc * scale, float("-inf"))
                m_new = tl.maximum(m, tl.max(sc, 1))
                p = tl.exp(sc - m_new[:, None])
                alpha = tl.exp(m - m_new)
                l_sum = l_sum * alpha + tl.sum(p, 1)
                v = tl.load(v_ptr + off, mask=kv_mask, other=0.0)
                if IEEE:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m = m_new
            o = acc / l_sum[:, None]
            omask = hmask[:, None] & dmask[None, :]
            if DIRECT:
                tl.store(out_ptr + (b * n_heads + heads)[:, None] * HEAD_DIM + d[None, :],
                         o.to(out_ptr.dtype.element_ty), mask=omask)
            else:
                part = (b * n_heads + heads) * n_splits + s
                tl.store(po_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=omask)
                tl.store(pm_ptr + part, m, mask=hmask)
                tl.store(pl_ptr + part, l_sum, mask=hmask)
        elif DIRECT:  # an empty (padding) row: zeros, as the reference
            if s == 0:
                tl.store(out_ptr + (b * n_heads + heads)[:, None] * HEAD_DIM + d[None, :],
                         tl.zeros([BLOCK_G, HD], tl.float32).to(out_ptr.dtype.element_ty),
                         mask=hmask[:, None] & dmask[None, :])

    @triton.jit
    def _merge(po_ptr, pm_ptr, pl_ptr, lens_ptr, out_ptr, n_heads, split_tokens, n_splits,
               HEAD_DIM: tl.constexpr, HD: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HD)
        dmask = d < HEAD_DIM
        length = tl.load(lens_ptr + b)
        used = tl.cdiv(length, split_tokens)
        base = (b * n_heads + h) * n_splits
        m_all = tl.full([1], float("-inf"), tl.float32)
        for s in range(0, used):
            m_all = tl.maximum(m_all, tl.load(pm_ptr + base + s + tl.zeros([1], tl.int32)))
        num = tl.zeros([HD], tl.float32)
        den = tl.zeros([1], tl.float32)
        for s in range(0, used):
            w = tl.load(pl_ptr + base + s + tl.zeros([1], tl.int32)) * tl.exp(
                tl.load(pm_ptr + base + s + tl.zeros([1], tl.int32)) - m_all)
            num += tl.load(po_ptr + (base + s) * HEAD_DIM + d, mask=dmask, other=0.0) * w
            den += w
        o = tl.where(den > 0, num / tl.maximum(den, 1e-30), 0.0)
        tl.store(out_ptr + (b * n_heads + h) * HEAD_DIM + d, o.to(out_ptr.dtype.element_ty),
                 mask=dmask)


def split_tokens_for(batch: int, n_kv: int, block_size: int) -> int | None:
    """Context chunk per program: split only when (sequences x KV heads) alone would leave most
    of the GPU idle. None = no split."""
    work = batch * n_kv
    if work >= 1024:
        return None
    return max(block_size, (256 if work < 256 else 1024) // block_size * block_size)


def paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, scale, max_len: int,
                 split_tokens: int | None = None):
    """out, q [B, nH, hd]; caches [num_blocks, block_size, nKV, hd]; block_tables [B, W] int32;
    seq_lens [B] int32; max_len: an upper bound of seq_lens (fixes the grid, e.g. for a graph)."""
    b, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    if split_tokens is None:
        split_tokens = split_tokens_for(b, n_kv, block_size)
    direct = split_tokens is None or split_tokens >= max_len
    if direct:
        split_tokens = max(max_len, 1)
    n_splits = max(1, -(-max_len // split_tokens))
    hd = triton.next_power_of_2(head_dim)
    ieee = q.dtype == torch.float32
    if direct:
        po = pm = pl = out  # unused
    else:
        po = torch.empty(b * n_heads * n_splits, head_dim, device=q.device, dtype=torch.float32)
        pm = torch.empty(b * n_heads * n_splits, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
    _decode[(b, n_kv, n_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, out, po, pm, pl, scale,
        block_tables.stride(0), n_heads, n_kv, group, block_size, split_tokens, n_splits,
        HEAD_DIM=head_dim, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=16 if ieee else 32, DIRECT=direct, IEEE=ieee)
    if not direct:
        _merge[(b, n_heads)](po, pm, pl, seq_lens, out, n_heads, split_tokens, n_splits,
                             HEAD_DIM=head_dim, HD=hd)
    return out
