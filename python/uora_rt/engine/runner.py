"""Runs one step: the model over the packed tokens (attention over the page table), then the
sampler. Decode-only steps on CUDA replay a captured graph (engine/graphs.py)."""

from __future__ import annotations

import logging
import weakref

import torch

from uora_rt.engine.attention import PagedAttention, choose_attention
from uora_rt.engine.kv_cache import KVPool
from uora_rt.engine.sampler import Sampler

log = logging.getLogger("uora_rt.engine")


class ModelRunner:
    def __init__(self, rt, kv: KVPool, attention: str | None = None, cuda_graphs=None,
                 max_num_seqs: int = 256, max_blocks: int = 1):
        self.rt, self.kv = rt, kv
        self.decode_fn, self.prefill_fn, self.attention_path = choose_attention(rt.device,
                                                                               attention)
        self.gather_prefill = self.prefill_fn is None  # the SDPA path reads gathered context
        self.sampler = Sampler(rt.device)
        # Graphs need an attention path with a length-independent grid (Triton); the gather
        # path's shapes follow the lengths.
        want = rt.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = None
        if want:
            if rt.device.type != "cuda" or self.attention_path != "triton":
                raise ValueError(f"cuda_graphs need CUDA and the Triton attention path, got "
                                 f"{rt.device.type} / {self.attention_path}")
            from uora_rt.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(rt, kv, self.decode_fn, self.sampler, max_num_seqs,
                                       max_blocks)
        log.info("engine steps: %s", "decode steps from CUDA graphs, the rest eager"
                 if self.graphs else "eager")
        # Under tensor parallelism each worker holds its KV heads' share of this cache, until
        # close() or until this runner is garbage (an engine dropped without close()).
        tp = getattr(rt, "tp", None)
        self.tp_kv = tp.open_kv(kv.num_blocks, kv.block_size, self.attention_path) if tp else None
        self._release = weakref.finalize(self, tp.close_kv, self.tp_kv) if tp else None

    def close(self) -> None:
        if self._release is not None:
            self._release()  # runs once

    @torch.no_grad()
    def run(self, meta) -> torch.Tensor:
        """Token ids [R] drawn for the step's sampled rows (on the device)."""
        if self.graphs is not None and meta.sampled:
            tokens = self.graphs.run(meta)
            if tokens is not None:
                return tokens
        attention = PagedAttention(meta, self.kv, self.decode_fn, self.prefill_fn)
        if self.tp_kv is not None:
            if not self._release.alive:
                raise RuntimeError("this engine is closed")
            logits = self.rt.tp.run_step(meta, self.tp_kv, attention)
        else:
            logits = self.rt.model(meta.input_ids, meta.positions, attention, meta.hook,
                                   rows=meta.logits_rows)
        if not meta.sampled:
            return torch.empty(0, dtype=torch.long, device=logits.device)
        return self.sampler(logits.float(), meta.sampling, meta.any_sampled, meta.any_top_p)
