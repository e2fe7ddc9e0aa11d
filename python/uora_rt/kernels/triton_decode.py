"""Paged decode attention for CUDA in Triton: one query token per sequence, keys and values
read in place through the block table (flash-decoding: the context is split into chunks that
run in parallel, then merged).

Grid (sequence, KV head, split). A program loads the query heads that share its KV head
(padded to 16 rows for tensor-core dots), walks its share of the context (1/n_splits of the
sequence's own length, whole BLOCK_N tiles) with an online softmax in float32, and writes either
the final output (one split) or its partial (normalized output, max, sum) for `_merge`. The grid
depends only on the batch, never on lengths, so a CUDA graph captured once serves any lengths.

Semantics: reference.paged_attention with one query per sequence (query_start = 0, 1, ..., B).
Runs only where Triton does (kernels.routes decides).
"""

from __future__ import annotations

import torch

from uora_rt.kernels._triton import tl, triton



if triton is not None:

    @triton.jit
    def _decode(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr,
                scale, stride_bt, n_heads, n_kv, group, block_size, n_splits,
                HEAD_DIM: tl.constexpr, HD: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.program_id(2)
        length = tl.load(lens_ptr + b)
        chunk = tl.cdiv(tl.cdiv(length, n_splits), BLOCK_N) * BLOCK_N
        start = s * chunk
        end = tl.minimum(start + chunk, length)
        rows = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HD)
        hmask = rows < group
        dmask = d < HEAD_DIM
        omask = hmask[:, None] & dmask[None, :]
        heads = g * group + rows
        q = tl.load(q_ptr + (b * n_heads + heads)[:, None] * HEAD_DIM + d[None, :], mask=omask,
                    other=0.0)
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
        # An empty range (a padding row, or a split past a short sequence) leaves l_sum = 0:
        # zeros out, weight 0 in the merge.
        o = acc / tl.maximum(l_sum, 1e-30)[:, None]
        if DIRECT:
            tl.store(out_ptr + (b * n_heads + heads)[:, None] * HEAD_DIM + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=omask)
        else:
            part = (b * n_heads + heads) * n_splits + s
            tl.store(po_ptr + part[:, None] * HEAD_DIM + d[None, :], o, mask=omask)
            tl.store(pm_ptr + part, m, mask=hmask)
            tl.store(pl_ptr + part, l_sum, mask=hmask)

    @triton.jit
    def _merge(po_ptr, pm_ptr, pl_ptr, out_ptr, n_heads, n_splits,
               HEAD_DIM: tl.constexpr, HD: tl.constexpr, SPLITS: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        d = tl.arange(0, HD)
        sp = tl.arange(0, SPLITS)
        smask = sp < n_splits
        base = (b * n_heads + h) * n_splits
        m = tl.load(pm_ptr + base + sp, mask=smask, other=float("-inf"))
        l_sum = tl.load(pl_ptr + base + sp, mask=smask, other=0.0)
        live = l_sum > 0
        m_all = tl.max(tl.where(live, m, float("-inf")), 0)
        w = tl.where(live, l_sum * tl.exp(m - m_all), 0.0)                    # [SPLITS]
        o = tl.load(po_ptr + (base + sp)[:, None] * HEAD_DIM + d[None, :],
                    mask=smask[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # [SPLITS, HD]
        num = tl.sum(o * w[:, None], 0)
        den = tl.sum(w, 0)
        res = num / tl.maximum(den, 1e-30)
        tl.store(out_ptr + (b * n_heads + h) * HEAD_DIM + d, res.to(out_ptr.dtype.element_ty),
                 mask=d < HEAD_DIM)


# Launch settings of _decode for 16-bit caches (float32 takes BLOCK_N 16, IEEE dots); None = the
# Triton default. Swept by bench/kernels/decode_tune_gpu.py on the H200 (runs/decode_tune_run1
# .json): 64-key tiles, 4 warps, 2 stages won or tied on every shape, e.g. the 7B batch 64 at
# 138 us (4.04 TB/s) against 160 us (3.49 TB/s) for the earlier 32 / 4 / 3.
CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 2}


def splits_for(batch: int, n_kv: int) -> int:
    """Context splits per (sequence, KV head): enough programs to fill the GPU when sequences x
    KV heads alone would not (~500 programs keep an H200's 132 SMs busy), at most 16."""
    return max(1, min(16, 512 // max(1, batch * n_kv)))


def paged_decode(out, q, k_cache, v_cache, block_tables, seq_lens, scale,
                 n_splits: int | None = None):
    """out, q [B, nH, hd]; caches [num_blocks, block_size, nKV, hd]; block_tables [B, W] int32;
    seq_lens [B] int32. The grid depends on B only (CUDA-graph safe for any lengths)."""
    b, n_heads, head_dim = q.shape
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    n_splits = n_splits or splits_for(b, n_kv)
    direct = n_splits == 1
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
        block_tables.stride(0), n_heads, n_kv, n_heads // n_kv, block_size, n_splits,
        HEAD_DIM=head_dim, HD=hd, BLOCK_G=max(16, triton.next_power_of_2(n_heads // n_kv)),
        BLOCK_N=16 if ieee else CONFIG["block_n"], DIRECT=direct, IEEE=ieee,
        **{k: v for k, v in CONFIG.items() if k != "block_n" and v is not None and not ieee})
    if not direct:
        _merge[(b, n_heads)](po, pm, pl, out, n_heads, n_splits, HEAD_DIM=head_dim, HD=hd,
                             SPLITS=max(2, triton.next_power_of_2(n_splits)))
    return out
