"""Paged attention for prefill chunks in Triton: the packed query rows of many sequences, each
with its context already in the page table, in one launch (no padding, no gathered copy).

Grid (query tile, KV head). A tile is BLOCK_M consecutive query rows of one sequence (the host
lists tiles: `tiles_for`). A program takes those rows for every query head that shares its KV
head (rows x heads flattened into one tile, so K and V are read once per group), walks the
keys from 0 to the tile's last position through the block table, BLOCK_N at a time, with the
causal mask (key position <= query position) and an online softmax in float32.

Semantics: reference.paged_attention (query_start / seq_lens / block_tables as there).
"""

from __future__ import annotations

import torch

from uora_rt.kernels._triton import tl, triton

BLOCK_M = 16



def tiles_for(query_start: list[int]) -> list[tuple[int, int]]:
    """(sequence, first query row within it) of every BLOCK_M-row tile."""
    return [(s, r) for s in range(len(query_start) - 1)
            for r in range(0, query_start[s + 1] - query_start[s], BLOCK_M)]


if triton is not None:

    @triton.jit
    def _prefill(q_ptr, k_ptr, v_ptr, out_ptr, bt_ptr, lens_ptr, qs_ptr, tiles_ptr, scale,
                 stride_bt, n_heads, n_kv, group, block_size,
                 HEAD_DIM: tl.constexpr, HD: tl.constexpr, GP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        i = tl.program_id(0)
        g = tl.program_id(1)
        seq = tl.load(tiles_ptr + 2 * i)
        r0 = tl.load(tiles_ptr + 2 * i + 1)
        q0 = tl.load(qs_ptr + seq)
        n = tl.load(qs_ptr + seq + 1) - q0
        ctx = tl.load(lens_ptr + seq) - n  # keys before this chunk
        rows = tl.arange(0, BLOCK_M * GP)
        m_idx = rows // GP                   # query row within the tile
        h_idx = rows % GP                    # query head within the group
        row_ok = (r0 + m_idx < n) & (h_idx < group)
        qpos = ctx + r0 + m_idx              # absolute position of each row's query
        d = tl.arange(0, HD)
        dmask = d < HEAD_DIM
        q_off = ((q0 + r0 + m_idx) * n_heads + g * group + h_idx)[:, None] * HEAD_DIM + d[None, :]
        q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & dmask[None, :], other=0.0)
        m = tl.full([BLOCK_M * GP], float("-inf"), tl.float32)
        l_sum = tl.zeros([BLOCK_M * GP], tl.float32)
        acc = tl.zeros([BLOCK_M * GP, HD], tl.float32)
        k_end = ctx + tl.minimum(r0 + BLOCK_M, n)  # keys the tile's last row may see
        for t0 in range(0, k_end, BLOCK_N):
            t = t0 + tl.arange(0, BLOCK_N)
            tmask = t < k_end
            blk = tl.load(bt_ptr + seq * stride_bt + t // block_size, mask=tmask, other=0)
            slot = blk.to(tl.int64) * block_size + t % block_size
            off = (slot * n_kv + g)[:, None] * HEAD_DIM + d[None, :]
            kv_mask = tmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + off, mask=kv_mask, other=0.0)
            if IEEE:
                sc = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                sc = tl.dot(q, tl.trans(k))
            allowed = tmask[None, :] & (t[None, :] <= qpos[:, None])
            sc = tl.where(allowed, sc * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(sc, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet
            p = tl.exp(sc - m_safe[:, None])
            alpha = tl.exp(m - m_safe)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + off, mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m = m_new
        o = acc / tl.maximum(l_sum, 1e-30)[:, None]
        tl.store(out_ptr + q_off, o.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dmask[None, :])


def paged_prefill(out, q, k_cache, v_cache, block_tables, seq_lens, query_start, tiles, scale):
    """out, q [T, nH, hd]; caches [num_blocks, block_size, nKV, hd]; block_tables [B, W] int32;
    seq_lens [B] int32; query_start [B + 1] int32; tiles [NT, 2] int32 (tiles_for)."""
    n_heads, head_dim = q.shape[1], q.shape[2]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    if tiles.shape[0] == 0:
        return out
    ieee = q.dtype == torch.float32
    _prefill[(tiles.shape[0], n_kv)](
        q, k_cache, v_cache, out, block_tables, seq_lens, query_start, tiles, scale,
        block_tables.stride(0), n_heads, n_kv, group, block_size,
        HEAD_DIM=head_dim, HD=triton.next_power_of_2(head_dim),
        GP=triton.next_power_of_2(group), BLOCK_M=BLOCK_M, BLOCK_N=16 if ieee else 32,
        IEEE=ieee)
    return out
