"""Runs one step's forward: the model over the packed tokens, attention over the page table."""

from __future__ import annotations

import torch

from uora_rt.engine.attention import PagedAttention, choose_decode_fn
from uora_rt.engine.kv_cache import KVPool


class ModelRunner:
    def __init__(self, rt, kv: KVPool, attention: str | None = None):
        self.rt, self.kv = rt, kv
        self.decode_fn, self.attention_path = choose_decode_fn(rt.device, attention)

    @torch.no_grad()
    def execute(self, meta) -> torch.Tensor:
        """Logits [R, V] float32 of the step's sampled rows."""
        attention = PagedAttention(meta, self.kv, self.decode_fn)
        logits = self.rt.model(meta.input_ids, meta.positions, attention, meta.hook,
                               rows=meta.logits_rows)
        return logits.float()
