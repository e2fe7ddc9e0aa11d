"""Static decode steps, replayed from CUDA graphs on the GPU.

One `StaticDecoder` per (batch bucket, cache capacity, adapter signature) owns every tensor a
decode step touches: token ids, positions, the key mask, the write index, the KV cache and the
per-token adapter slot ids. A step only updates those tensors in place and replays the graph, so
adding or removing adapters (which only writes slot rows of the pool's tables) needs no
recapture; a new family, a family's table growing, or a different with_q does (it is part of the
signature). On the CPU the same object runs the step eagerly (used by the tests).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from uora_rt.pool import AdapterBatch, FamilyView

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CAPACITY_STEP = 64  # cache capacities are rounded up to this, so few graphs serve all lengths


def bucket_for(n: int) -> int:
    return next((b for b in BUCKETS if b >= n), n)


def capacity_for(n: int) -> int:
    return -(-n // CAPACITY_STEP) * CAPACITY_STEP


def signature(hook: AdapterBatch | None):
    if hook is None:
        return ()
    return tuple((f.key, f.with_q, id(f.lambda_d), id(f.lambda_b), id(f.p), f.fused is not None)
                 for f in hook.families)


class StaticDecoder:
    def __init__(self, rt, bucket: int, capacity: int, hook: AdapterBatch | None, graph: bool):
        self.model, dev = rt.model, rt.device
        self.bucket, self.capacity = bucket, capacity
        self.cache = rt.model.new_cache(bucket, capacity)
        self.ids = torch.zeros(bucket, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(bucket, 1, dtype=torch.long, device=dev)
        self.key_valid = torch.zeros(bucket, capacity, dtype=torch.bool, device=dev)
        self.write_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.hook = None
        if hook is not None:  # a private hook whose per-token slots are these static tensors
            views = [FamilyView(**{**f.__dict__, "seq_slots": torch.full((bucket,), -1,
                                                                          dtype=torch.int32)})
                     for f in hook.families]
            self.hook = AdapterBatch(hook.pool, views, torch.ones(bucket, 1, dtype=torch.bool,
                                                                  device=dev), counted=False)
        self.graph = None
        self.logits = None
        if graph:
            self._capture()

    def _run(self):
        return self.model.decode(self.ids, self.pos, self.key_valid, self.write_idx, self.cache,
                                 self.hook)

    def _capture(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: lazy weights, cuBLAS handles, autotuning
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def start(self, valid, last_pos, hook: AdapterBatch | None):
        """Loads one request whose prefill already wrote rows [:B] of self.cache: its key mask
        [B, L] and last positions [B]."""
        b, n = valid.shape
        self.key_valid.zero_()
        self.key_valid[:b, :n] = valid
        self.pos.zero_()
        self.pos[:b, 0] = last_pos
        self.write_idx.fill_(n)
        if self.hook is not None:
            for mine, theirs in zip(self.hook.token_slots, hook.families):
                slots = torch.full((self.bucket,), -1, dtype=torch.int32)
                slots[:b] = theirs.seq_slots
                mine.copy_(slots.to(mine.device))

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row ([B] for the first B rows) and returns logits [B, V]."""
        b = next_ids.shape[0]
        self.ids[:b, 0] = next_ids
        self.pos.add_(1)
        self.key_valid.index_fill_(1, self.write_idx, True)
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._run()
        self.write_idx.add_(1)
        return self.logits[:b]


class DecoderCache:
    """The runtime's static decoders, least recently used first out (their KV caches are big)."""

    def __init__(self, keep: int = 1):
        self.keep, self.items = keep, OrderedDict()

    def get(self, rt, batch: int, capacity: int, hook, graph: bool) -> StaticDecoder:
        key = (bucket_for(batch), capacity_for(capacity), signature(hook))
        dec = self.items.pop(key, None)
        if dec is None:
            while len(self.items) >= self.keep:
                self.items.popitem(last=False)
            dec = StaticDecoder(rt, key[0], key[1], hook, graph)
        self.items[key] = dec
        return dec
