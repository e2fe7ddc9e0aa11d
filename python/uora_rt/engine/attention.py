"""Attention over the page table, for the packed tokens of one engine step.

A step's tokens are packed as [decode rows (one token per sequence) | prefill chunks]. For each
layer the new keys/values are written into the KV pool at their slots first; then
- decode rows: one call over the block tables with per-row lengths (`decode_fn`: the C++ op
  uora::paged_attention_ on the CPU, the Triton kernel of kernels/triton_decode.py on CUDA, both
  reading the pages in place; or `torch_paged_decode`, which gathers them, where neither runs);
- prefill chunks: one call over all of them (`prefill_fn`: the same C++ op, or the Triton kernel
  of kernels/triton_prefill.py), or, on the gather path, SDPA per chunk over its own keys (no
  context)
  or over its context gathered from the pool with an offset causal mask.
reference.paged_attention is the oracle for all of it.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from uora_rt.kernels import ops, triton_available, triton_decode, triton_prefill
from uora_rt.kernels.fused import triton_rope_store

log = logging.getLogger("uora_rt.engine")


def torch_paged_decode(out, q, k_cache, v_cache, meta, scale):
    """One query per row: gather each row's keys through its block table (positions past its
    length read the zeroed block 0 and are masked), then SDPA. q, out [B, nH, hd]; caches
    [num_blocks, block_size, nKV, hd]; meta.decode_block_tables [B, W] int32,
    meta.decode_seq_lens [B] int32."""
    block_tables, seq_lens = meta.decode_block_tables, meta.decode_seq_lens
    bs = k_cache.shape[1]
    width = block_tables.shape[1] * bs
    pos = torch.arange(width, device=q.device)
    slots = block_tables.long()[:, pos // bs] * bs + pos % bs                  # [B, W*bs]
    valid = pos[None, :] < seq_lens[:, None].long()
    slots = torch.where(valid, slots, torch.zeros_like(slots))
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    k = flat_k[slots].transpose(1, 2)                                          # [B, nKV, S, hd]
    v = flat_v[slots].transpose(1, 2)
    att = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None],
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    out.copy_(att[:, :, 0])


def cpu_paged_decode(out, q, k_cache, v_cache, meta, scale):
    ops.paged_attention_(out, q, k_cache, v_cache, meta.decode_block_tables, meta.decode_seq_lens,
                         meta.decode_query_start, scale)


def cpu_paged_prefill(out, q, k_cache, v_cache, meta, scale):
    ops.paged_attention_(out, q, k_cache, v_cache, meta.prefill_block_tables,
                         meta.prefill_seq_lens, meta.prefill_query_start, scale)


def triton_paged_prefill(out, q, k_cache, v_cache, meta, scale):
    triton_prefill.paged_prefill(out, q, k_cache, v_cache, meta.prefill_block_tables,
                                 meta.prefill_seq_lens, meta.prefill_query_start,
                                 meta.prefill_tiles, scale)


def triton_paged_decode(out, q, k_cache, v_cache, meta, scale):
    triton_decode.paged_decode(out, q, k_cache, v_cache, meta.decode_block_tables,
                               meta.decode_seq_lens, scale)


def choose_attention(device: torch.device, path: str | None = None):
    """(decode_fn, prefill_fn or None, name) of an attention path for a device ("cpp", "triton"
    or "torch"; None = the fastest available), said once in the log (never silently)."""
    paths = {"cpp": device.type == "cpu" and hasattr(ops, "paged_attention_"),
             "triton": device.type == "cuda" and triton_available(), "torch": True}
    if path is not None and path not in paths:
        raise ValueError(f"attention path: expected None or one of {sorted(paths)}, got {path!r}")
    if path is not None and not paths[path]:
        raise ValueError(f"the {path} paged attention path does not run on {device.type}")
    if paths["cpp"] and path in (None, "cpp"):
        log.info("paged attention: uora::paged_attention_ (C++, pages read in place)")
        return cpu_paged_decode, cpu_paged_prefill, "cpp"
    if paths["triton"] and path in (None, "triton"):
        log.info("paged attention: Triton paged decode and prefill (pages read in place)")
        return triton_paged_decode, triton_paged_prefill, "triton"
    log.info("paged attention on %s: the PyTorch gather path (decode rows gathered, prefill "
             "chunks through SDPA)", device.type)
    return torch_paged_decode, None, "torch"


class PagedAttention:
    """The model's attention callable for one step (see models.llama.LlamaModel.forward)."""

    def __init__(self, meta, kv, decode_fn, prefill_fn=None):
        self.meta, self.kv, self.decode_fn, self.prefill_fn = meta, kv, decode_fn, prefill_fn

    @property
    def takes_qkv(self) -> bool:
        """Whether attend_qkv can run: the fused RoPE + KV write leaves no k, v tensors, so every
        part of the step must read keys from the cache (not the gather path's fresh prompts)."""
        return self.prefill_fn is not None or not self.meta.prefills

    def attend_qkv(self, layer, qkv, cos, sin, n_heads, n_kv, head_dim, extra=None):
        """qkv [T, (nH + 2 nKV) hd] straight from the GEMM, with its pending adapter delta
        (kernels.fused.triton_rope_store adds it, ropes q and k and writes k, v into the cache)
        -> [T, nH, hd]."""
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]
        q = triton_rope_store(qkv, cos, sin, self.meta.slot_mapping, k_cache, v_cache, n_heads,
                              n_kv, head_dim, extra)
        return self._attend(q, None, None, k_cache, v_cache)

    def __call__(self, layer, q, k, v):
        """q [T, nH, hd], k, v [T, nKV, hd] -> [T, nH, hd]."""
        k_cache, v_cache = self.kv.k[layer], self.kv.v[layer]
        flat_k = k_cache.view(-1, *k_cache.shape[2:])
        flat_v = v_cache.view(-1, *v_cache.shape[2:])
        flat_k.index_copy_(0, self.meta.slot_mapping, k)
        flat_v.index_copy_(0, self.meta.slot_mapping, v)
        return self._attend(q, k, v, k_cache, v_cache)

    def _attend(self, q, k, v, k_cache, v_cache):
        m = self.meta
        out = torch.empty_like(q)
        scale = q.shape[-1] ** -0.5
        nd = m.num_decode
        if nd:
            self.decode_fn(out[:nd], q[:nd], k_cache, v_cache, m, scale)
        if m.prefills and self.prefill_fn is not None:
            self.prefill_fn(out[nd:], q[nd:], k_cache, v_cache, m, scale)
            return out
        for seg in m.prefills:
            qs = q[seg.start:seg.start + seg.count].transpose(0, 1)[None]      # [1, nH, n, hd]
            if seg.context == 0:  # a fresh prompt: only its own keys, plain causal
                ks = k[seg.start:seg.start + seg.count]
                vs = v[seg.start:seg.start + seg.count]
                mask, causal = None, True
            else:
                ks = k_cache.view(-1, *k_cache.shape[2:])[seg.context_slots]
                vs = v_cache.view(-1, *v_cache.shape[2:])[seg.context_slots]
                mask, causal = seg.mask, False
            att = F.scaled_dot_product_attention(
                qs, ks.transpose(0, 1)[None], vs.transpose(0, 1)[None], attn_mask=mask,
                is_causal=causal, scale=scale, enable_gqa=qs.shape[1] != ks.shape[1])
            out[seg.start:seg.start + seg.count] = att[0].transpose(0, 1)
        return out
