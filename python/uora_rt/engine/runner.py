"""Runs one step: the model over the packed tokens (attention over the page table), then the
sampler. Decode-only steps on CUDA replay a captured graph (engine/graphs.py).

The same runner runs on every tensor-parallel rank (as nano-vllm's does): rank 0's engine hands
it `peers` (parallel.driver.TensorParallel), to which it sends each step before running its own
shard; the other ranks' runners get the step from the wire and run the same forward, without
logits rows. Padded batches (Runtime.forward) take `padded_forward`, also on every rank.
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

from uora_rt.adapters.manager import AdapterManager
from uora_rt.engine.attention import PagedAttention, choose_attention
from uora_rt.engine.kv_cache import KVPool
from uora_rt.engine.metadata import to_device
from uora_rt.engine.processors import ProcessorState, sample_step
from uora_rt.engine.sampler import Sampler
from uora_rt.kernels.routes import KernelPrefs, choose
from uora_rt.models.common import PaddedAttention

log = logging.getLogger("uora_rt.engine")


def step_routes(model, adapters: AdapterManager, prefs: KernelPrefs, device, rows: int):
    """The kernel routes of one forward of `rows` tokens (kernels.routes.choose)."""
    return choose(prefs, device, model.embed.weight.dtype if model.kind == "decoder"
                  else model.word.weight.dtype, adapters.factor_dtype, rows,
                  model.kind == "decoder")


@torch.no_grad()
def padded_forward(model, adapters: AdapterManager, prefs: KernelPrefs, ids, positions, valid,
                   token_slots: dict, with_q: dict, announce=None, types=None):
    """One forward of a padded batch [B, L] (no KV cache): decoders -> logits [B, L, V] (none
    on tensor-parallel workers: rank 0 alone computes the head), encoders -> (hidden [B, L, H],
    pooled [B, H]). token_slots / with_q: per family id, as in a step's metadata (-1 = no
    adapter, padding included). announce(changes), on a tensor-parallel driver, sends the
    adapter changes taken with the batch (AdapterManager.batch) and the forward to the workers
    before this rank runs its shard. types: an encoder's token type ids [B, L] (None: all 0)."""
    routes = step_routes(model, adapters, prefs, ids.device, ids.numel())
    changes = [] if announce is not None else None
    hook = adapters.batch(token_slots, with_q, routes, changes)
    if announce is not None:
        announce(changes)
    if model.kind == "decoder":
        rows = None if model.shard is None or model.shard.rank == 0 else \
            torch.empty(0, dtype=torch.long, device=ids.device)
        return model(ids, positions, PaddedAttention(valid), hook, rows=rows, routes=routes)
    return model(ids, valid, hook, types)


class ModelRunner:
    """model: a decoder (one rank's shard under tensor parallelism); kv: its paged cache;
    adapters: the manager whose slots the steps name; peers: the workers to drive (rank 0 of a
    tensor-parallel runtime), None otherwise."""

    def __init__(self, model, kv: KVPool, adapters: AdapterManager, prefs: KernelPrefs,
                 attention: str | None = None, cuda_graphs=None, max_num_seqs: int = 256,
                 max_blocks: int = 1, peers=None):
        self.model, self.kv, self.adapters, self.prefs, self.peers = (
            model, kv, adapters, prefs, peers)
        self.device = kv.k.device
        self.decode_fn, self.prefill_fn, self.attention_path = choose_attention(self.device,
                                                                               attention)
        self.gather_prefill = self.prefill_fn is None  # the SDPA path reads gathered context
        self.sampler = Sampler(self.device)
        self._processors = None
        self._worker = None  # async scheduling on the CPU: the thread steps run in (launch)
        # Off: on the CPU the forward's intra-op threads already fill the cores, so a worker
        # thread only moves the host's Python into the forward's time (bench/bench_async_cpu.py,
        # docs/async-scheduling.md); on for measuring that, or for machines with spare cores.
        self.cpu_overlap = False
        self._max_len = max_blocks * kv.block_size
        # Graphs need an attention path with a length-independent grid (Triton); the gather
        # path's shapes follow the lengths.
        want = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        self.graphs = None
        if want:
            if peers is not None:
                raise ValueError("cuda_graphs are not supported under tensor parallelism")
            if self.device.type != "cuda" or self.attention_path != "triton":
                raise ValueError(f"cuda_graphs need CUDA and the Triton attention path, got "
                                 f"{self.device.type} / {self.attention_path}")
            from uora_rt.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_num_seqs, max_blocks)
        log.info("engine steps: %s", "decode steps from CUDA graphs, the rest eager"
                 if self.graphs else "eager")
        # Under tensor parallelism each worker holds its KV heads' share of this cache, until
        # close() or until this runner is garbage (an engine dropped without close()).
        self.peer_kv = (peers.open_kv(kv.num_blocks, kv.block_size, self.attention_path)
                        if peers is not None else None)
        self._release = (weakref.finalize(self, peers.close_kv, self.peer_kv)
                         if peers is not None else None)

    @property
    def processors(self) -> ProcessorState:
        """The per-request logit-processing tables (made on first use: rank 0 alone samples)."""
        if self._processors is None:
            self._processors = ProcessorState(self.model.spec.vocab, self._max_len, self.device)
        return self._processors

    def close(self) -> None:
        if self._release is not None:
            self._release()  # runs once
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None

    def routes(self, rows: int):
        return step_routes(self.model, self.adapters, self.prefs, self.device, rows)

    @torch.no_grad()
    def forward(self, meta, rows=None):
        """The model over a step's tokens; logits of `rows` (None: every token)."""
        routes = self.routes(meta.num_tokens)
        if self.peers is not None and not self._release.alive:
            raise RuntimeError("this engine is closed")
        with (self.peers.exclusive("an engine step") if self.peers is not None
              else nullcontext()):
            changes = [] if self.peers is not None else None
            hook = self.adapters.batch(meta.adapter_slots, meta.adapter_with_q, routes, changes)
            if self.peers is not None:
                self.peers.send_step(self.peer_kv, meta, changes)
            attention = PagedAttention(meta, self.kv, self.decode_fn, self.prefill_fn)
            return self.model(meta.input_ids, meta.positions, attention, hook, rows=rows,
                              routes=routes)

    @torch.no_grad()
    def run(self, meta):
        """(token ids [R] drawn for the step's sampled rows, on the host; logprob table
        [L, 2 + 2k] float64 or None). Sampler.finish makes the step's one device-to-host copy
        of the tokens and re-draws the rows the window could not (processors.sample_step)."""
        logits = None
        if self.graphs is not None and meta.sampled:
            out = self.graphs.run(meta)  # (logits of every decode, drawn or None with extras)
            if out is not None:
                if meta.extras is None:
                    return self.sampler.finish(*out, meta.sampling), None
                logits = out[0].index_select(0, meta.logits_rows)
        if logits is None:
            logits = self.forward(meta, meta.logits_rows)
        if not meta.sampled and meta.extras is None:
            return torch.empty(0, dtype=torch.long), None
        return sample_step(self.sampler, self.processors, logits.float().contiguous(), meta)

    # --- async scheduling ---------------------------------------------------------------------
    def sync_cause(self, meta) -> str | None:
        """Why this step cannot overlap the next one's scheduling, as a key of
        stepping.SYNC_CAUSES (None: it can)."""
        if self.peers is not None:
            return "tensor_parallel"
        if meta.extras is not None:
            return "extras"
        if (self.sampler.path == "device" and meta.any_sampled
                and self.sampler.window(meta.sampling, True)):
            return "device_window"
        return None

    def launch(self, meta, prev: "InFlight | None" = None, feed_src=(),
               sync: bool = False) -> "InFlight":
        """Starts a step without waiting for it. feed_src[i]: the row of prev's sampled tokens
        that becomes meta.feed_rows[i]'s input (a copy on the device, after prev's draw).
        On CUDA the step is queued on the stream and its tokens copied to pinned host memory
        behind it; on the CPU, which has no device queue, it runs in a worker thread (torch
        ops release the GIL there, so the host's Python runs beside them) if cpu_overlap is
        set, else in this thread, to its end. sync: a step with a sync_cause, run to the end
        (on CUDA in this thread, after prev on the stream)."""
        if self.device.type != "cuda" and not self.cpu_overlap:
            if meta.feed_rows:  # prev ran in this thread: its tokens are on the host
                _feed(meta.input_ids, meta.feed_rows, prev.done[0], feed_src)
            t = time.perf_counter()
            flight = InFlight(meta, done=self.run(meta))
            flight.run_s = time.perf_counter() - t
            return flight
        if self.device.type != "cuda":
            if self._worker is None:
                self._worker = ThreadPoolExecutor(1, thread_name_prefix="uora-step")

            flight = InFlight(meta)

            def task():
                t = time.perf_counter()
                if meta.feed_rows:
                    try:  # done: the worker runs steps in order
                        tokens = prev.future.result()[0]
                    except Exception:
                        # prev failed: the requests fed from it fail when it is resolved (its
                        # error is theirs), and their rows here are discarded; this step's other
                        # requests go on
                        tokens = None
                    if tokens is not None:
                        _feed(meta.input_ids, meta.feed_rows, tokens, feed_src)
                out = self.run(meta)
                flight.run_s = time.perf_counter() - t
                return out

            flight.future = self._worker.submit(task)
            return flight
        if meta.feed_rows:
            rows = to_device(torch.tensor(meta.feed_rows, dtype=torch.long), self.device)
            src = to_device(torch.tensor(list(feed_src), dtype=torch.long), self.device)
            meta.input_ids.index_copy_(0, rows, prev.device_tokens.index_select(0, src))
        if sync:
            return InFlight(meta, done=self.run(meta))
        drawn = self.draw(meta)
        host = torch.empty(drawn.shape, dtype=drawn.dtype, pin_memory=True)
        host.copy_(drawn, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return InFlight(meta, device_tokens=drawn, host=host, event=event)

    @torch.no_grad()
    def draw(self, meta) -> torch.Tensor:
        """The step's tokens [R] on the device, without a host sync: only for steps with no
        sync_cause (no extras, no row the sampler's window could leave undecided)."""
        if self.graphs is not None and meta.sampled:
            out = self.graphs.run(meta)
            if out is not None:
                return out[1]
        logits = self.forward(meta, meta.logits_rows)
        if not meta.sampled:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return self.sampler.draw(logits.float().contiguous(), meta.sampling, meta.any_sampled,
                                 meta.any_top_p)


def _feed(input_ids: torch.Tensor, rows: list[int], tokens: torch.Tensor, src) -> None:
    """input_ids[rows] = tokens[src] on the host. The usual decode step keeps the previous
    step's order (rows and src both 0..n-1): one slice copy then, no index tensors."""
    src = list(src)
    n = len(rows)
    if rows[-1] == n - 1 and src == rows:  # rows ascend: they are 0..n-1
        input_ids[:n] = tokens[:n]
    else:
        input_ids[rows] = tokens[src]


class InFlight:
    """A launched step: its metadata and, once it has run, its tokens on the host."""

    def __init__(self, meta, future: Future | None = None, device_tokens=None, host=None,
                 event=None, done=None):
        self.meta, self.future, self.done = meta, future, done
        self.device_tokens, self.host, self.event = device_tokens, host, event
        self.scheduled: list = []  # the step's ScheduledSeqs (the engine sets them)
        self.run_s: float | None = None  # how long it ran, where that is known (CPU worker)

    def result(self):
        """(token ids [R] on the host, logprob table or None); waits for the step. Raises what
        the step raised."""
        if self.done is not None:
            return self.done
        if self.future is not None:
            return self.future.result()
        self.event.synchronize()
        return self.host, None
