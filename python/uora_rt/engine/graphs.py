"""CUDA graphs for decode steps: the forward and the sampler of a step in which every sequence
decodes one token, captured once per padded batch size.

Every input of a captured step lives in a static buffer that is written before each replay:
token ids, positions, KV slots, block tables (full width), lengths, each token's adapter slot
per projection family, sampling parameters. Padding rows have length 0 (attention writes zeros
for them) and write their keys to the reserved block 0. So new requests, new lengths, adapter
add/remove and slot uploads never need a new capture. The key holds what changes the kernels
themselves: the batch bucket, greedy or sampled, and the adapter layout (which families, their
table versions, with or without the Q halves) and the sampler's window (Sampler.window: none
for greedy or temperature-only steps). Weights changing (merge/unmerge) drops them all. The
logits of a replay stay in one float32 buffer shared by all graphs until the next replay: the
runner's Sampler.finish re-draws from them the rows the window could not decide.
"""

from __future__ import annotations

from collections import OrderedDict
from types import SimpleNamespace

import torch

from uora_rt.engine.attention import PagedAttention
from uora_rt.engine.sampler import SamplingTensors

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512)


def bucket_for(n: int) -> int | None:
    return next((b for b in BUCKETS if b >= n), None)


class DecodeGraphs:
    """runner: the engine's ModelRunner (model, KV cache, adapters, attention, sampler)."""

    def __init__(self, runner, max_num_seqs: int, max_blocks: int,
                 keep: int = 8 * len(BUCKETS)):  # every bucket, greedy and 3 windows, 2 layouts
        self.runner = runner
        self.max_bucket = bucket_for(max_num_seqs) or max_num_seqs
        n, dev = self.max_bucket, runner.device
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.pos = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.zeros(n, dtype=torch.long, device=dev)
        self.tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.sampling = SamplingTensors(torch.zeros(n, device=dev),
                                        torch.zeros(n, dtype=torch.int32, device=dev),
                                        torch.ones(n, device=dev),
                                        torch.zeros(n, dtype=torch.long, device=dev),
                                        torch.zeros(n, dtype=torch.long, device=dev))
        self.adapter_slots: dict = {}  # family -> [n] int32 buffer
        self.logits = None  # [n, V] float32, allocated at the first capture
        self.graphs: OrderedDict = OrderedDict()
        self.keep, self.mempool = keep, torch.cuda.graph_pool_handle()
        self.version = runner.model.weights_version
        self.captures = 0

    def _family_buffer(self, fam):
        buf = self.adapter_slots.get(fam)
        if buf is None:
            buf = self.adapter_slots[fam] = torch.full((self.max_bucket,), -1, dtype=torch.int32,
                                                       device=self.runner.device)
        return buf

    def run(self, meta) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(logits [B, V], tokens [B] as Sampler.draw returns them, or None when the step has
        extras: then the graph ends at the logits) of a decode-only step, or None when this
        step is not one a graph runs."""
        b = meta.num_decode
        bucket = bucket_for(b)
        if meta.prefills or b == 0 or bucket is None or bucket > self.max_bucket:
            return None
        version = self.runner.model.weights_version
        if version != self.version:
            self.graphs.clear()
            self.version = version
        fams = list(meta.adapter_slots)  # family ids
        manager = self.runner.adapters
        sig = tuple((f, manager.family_of(f).version, meta.adapter_with_q[f]) for f in fams)
        # With logit processing or logprobs the graph ends at the logits; the rest runs eagerly.
        mode = "logits" if meta.extras is not None else meta.any_sampled
        window = 0 if mode == "logits" else \
            self.runner.sampler.window(meta.sampling, meta.any_sampled)
        key = (bucket, mode, sig, window)
        self._load(meta, b, bucket, fams)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(bucket, fams, meta.adapter_with_q, mode, window)
            self.graphs[key] = entry
            while len(self.graphs) > self.keep:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        entry[0].replay()
        return self.logits[:b], None if entry[1] is None else entry[1][:b]

    def _load(self, meta, b, bucket, fams) -> None:
        for buf, src, pad in ((self.ids, meta.input_ids, 0), (self.pos, meta.positions, 0),
                              (self.slots, meta.slot_mapping, 0),
                              (self.lens, meta.decode_seq_lens, 0)):
            buf[:b].copy_(src)
            buf[b:bucket].fill_(pad)
        w = meta.decode_block_tables.shape[1]
        self.tables[:b, :w].copy_(meta.decode_block_tables)
        for fam in fams:
            buf = self._family_buffer(fam)
            buf[:b].copy_(meta.adapter_slots[fam])
            buf[b:bucket].fill_(-1)
        st = meta.sampling
        for name in ("temperature", "top_k", "top_p", "seed", "position"):
            getattr(self.sampling, name)[:b].copy_(getattr(st, name))
        self.sampling.temperature[b:bucket].zero_()

    def _capture(self, bucket, fams, with_q, mode, window):
        static = SimpleNamespace(
            slot_mapping=self.slots[:bucket], num_decode=bucket, prefills=[],
            decode_block_tables=self.tables[:bucket], decode_seq_lens=self.lens[:bucket],
            decode_query_start=torch.arange(bucket + 1, dtype=torch.int32,
                                            device=self.runner.device))
        r = self.runner
        routes = r.routes(bucket)
        hook = r.adapters.batch({f: self._family_buffer(f)[:bucket] for f in fams}, with_q, routes)
        st = SamplingTensors(*(getattr(self.sampling, n)[:bucket] for n in
                               ("temperature", "top_k", "top_p", "seed", "position")))

        if self.logits is None:
            self.logits = torch.empty(self.max_bucket, r.model.spec.vocab, device=r.device)
        logits = self.logits[:bucket]

        def step():
            attention = PagedAttention(static, r.kv, r.decode_fn)
            # copy_ converts to float32 as .float() would, into the buffer finish reads.
            logits.copy_(r.model(self.ids[:bucket], self.pos[:bucket], attention, hook,
                                 routes=routes))
            if mode == "logits":
                return None
            return r.sampler.draw(logits, st, mode, mode, window)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compiles, fused weights get built
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            tokens = step()
        self.captures += 1
        return graph, tokens
