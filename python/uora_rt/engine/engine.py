"""`uora_rt.Engine`: requests that arrive at any time, each with its adapter (or none), served
by continuous batching over a paged KV cache. add_request and abort are safe from any thread
while one thread runs step()."""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import threading
import time

from uora_rt.engine.detokenizer import Detokenizer
from uora_rt.engine.kv_cache import BlockAllocator, KVPool, default_kv_tokens
from uora_rt.engine.metadata import RowCache
from uora_rt.engine.request import Request, RequestOutput, SamplingParams
from uora_rt.engine.rules import Limits, Prompts, RequestRules
from uora_rt.engine.runner import ModelRunner
from uora_rt.engine.scheduler import Scheduler
from uora_rt.engine.stepping import SYNC_CAUSES, Stepping
from uora_rt.kernels import triton_available

log = logging.getLogger("uora_rt.engine")


class Engine(RequestRules, Stepping):
    """rt: a decoder Runtime (uora_rt.load). kv_cache_tokens: KV capacity in tokens (rounded up
    to whole blocks); max_num_seqs: requests running at once; max_step_tokens: tokens computed per
    step
    (decodes first, then prefill chunks). Defaults: what the device's free memory allows, 256
    sequences and 8,192 tokens on a GPU, 64 and 512 on the CPU (a CPU step of 512 prompt tokens
    already takes ~0.2 s on SmolLM2-135M; longer steps would stall the running decodes).
    attention: the decode attention path, "cpp" (the CPU op), "triton" (CUDA) or "torch" (None:
    the fastest the device has; the choice is logged). cuda_graphs: replay decode steps from
    CUDA graphs (default: on CUDA with the Triton path). enable_prefix_caching: keep full KV
    blocks after their requests end and let later requests with the same prefix, under the same
    adapter bytes (or none), read them instead of computing them (docs/prefix-caching.md).
    detokenize: build text and match stop strings here (False in an engine core process, whose
    front ends do it). async_scheduling: schedule and launch each step while the one before it
    runs, and build that one's outputs meanwhile (engine/stepping.py, docs/async-scheduling.md);
    False: one step after the other, as before."""

    def __init__(self, rt, kv_cache_tokens: int | None = None, max_num_seqs: int | None = None,
                 max_step_tokens: int | None = None, block_size: int = 16,
                 attention: str | None = None, cuda_graphs: bool | None = None,
                 enable_prefix_caching: bool = True, detokenize: bool = True,
                 async_scheduling: bool = True):
        model = rt.model
        if model.kind != "decoder":
            raise ValueError("the engine serves decoder models; this base is an encoder")
        # The engine's collaborators, taken from the runtime once: the model (through the
        # runner), the adapter manager, the tokenizer, and the tensor-parallel peers if any.
        self.adapters, self.codec, spec = rt.manager, rt.codec, model.spec
        # Off in an engine core process: its front ends detokenize and match stop strings.
        self.detokenize = detokenize
        device, dtype = rt.device, rt.dtype
        cuda = device.type == "cuda"
        self.max_num_seqs = max_num_seqs or (256 if cuda else 64)
        self.max_step_tokens = max_step_tokens or (8192 if cuda else 512)
        self.max_model_len = spec.max_positions
        if kv_cache_tokens is None:
            weights = sum(p.numel() * p.element_size() for p in model.parameters())
            kv_cache_tokens = min(default_kv_tokens(spec, dtype, device, weights),
                                  self.max_num_seqs * self.max_model_len)
        for name, v in (("kv_cache_tokens", kv_cache_tokens), ("max_num_seqs", self.max_num_seqs),
                        ("max_step_tokens", self.max_step_tokens), ("block_size", block_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Engine: {name} must be a positive integer, got {v!r}")
        self.block_size = block_size
        num_blocks = -(-kv_cache_tokens // block_size) + 1  # + the reserved block 0
        self.kv = KVPool(spec, num_blocks, block_size, dtype, device)
        if not isinstance(enable_prefix_caching, bool):
            raise ValueError(f"Engine: enable_prefix_caching must be True or False, got "
                             f"{enable_prefix_caching!r}")
        self.prefix_caching = enable_prefix_caching
        if not isinstance(async_scheduling, bool):
            raise ValueError(f"Engine: async_scheduling must be True or False, got "
                             f"{async_scheduling!r}")
        self.async_scheduling = async_scheduling
        self._flight = None  # async scheduling: the launched step whose tokens are not read yet
        self._rows = RowCache()  # the sampled requests' columns, while they stay the same
        self._model = model
        self.allocator = BlockAllocator(num_blocks, caching=enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, block_size, self.max_num_seqs,
                                   self.max_step_tokens, self.adapters,
                                   self._cache_root if enable_prefix_caching else None)
        if cuda_graphs is None:  # graphs replay the Triton attention path, one device only
            cuda_graphs = (cuda and attention in (None, "triton") and triton_available()
                           and rt.tp is None)
        self.runner = ModelRunner(model, self.kv, self.adapters, rt.kernel_prefs, attention,
                                  cuda_graphs, self.max_num_seqs,
                                  -(-self.max_model_len // block_size), peers=rt.tp)
        self.eos = set(rt.eos_token_ids)
        self.limits = Limits(spec.vocab, self.max_model_len, self.kv_capacity_tokens)
        self.prompts = Prompts(self.codec, self.limits)
        self._lock = threading.Lock()
        self._inbox: list[Request] = []
        self._aborts: set[tuple[str, int | None]] = set()  # (request id, sequence or all)
        self._live: dict[str, list[Request]] = {}  # request id -> its unfinished sequences
        self._ids = itertools.count()
        self._seeds = random.Random()
        self.stats = {"steps": 0, "prefill_tokens": 0, "decode_tokens": 0, "step_s": 0.0,
                      "forward_s": 0.0, "peak_blocks": 0,
                      # forward_s: the host waiting for steps (synchronous: their whole run);
                      # run_s: how long the steps ran (forward and draw), where known (CPU)
                      "run_s": 0.0,
                      "forks": 0, "fork_prefills": 0,  # n > 1: sequences that copied / prefilled
                      # async scheduling: tokens computed past a sequence's end, and the steps
                      # run synchronously, by cause (sync_<cause>: stepping.SYNC_CAUSES)
                      "discarded_tokens": 0, **{f"sync_{c}": 0 for c in SYNC_CAUSES}}
        self._said_tp_forks = False
        log.info("engine: %d KV blocks of %d tokens (%.2f GB), %d sequences, %d tokens per step, "
                 "prefix caching %s, %s scheduling", num_blocks - 1, block_size,
                 self.kv.nbytes() / 1e9, self.max_num_seqs, self.max_step_tokens,
                 "on" if enable_prefix_caching else "off",
                 "async" if async_scheduling else "synchronous")

    # --- requests ---------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.allocator.capacity * self.block_size

    def add_request(self, prompt, adapter: str | None = None, params: SamplingParams | None = None,
                    request_id: str | None = None, on_output=None) -> str:
        """prompt: a string (through the chat template, as generate does) or token ids.
        on_output(RequestOutput), if given, is called from the stepping thread with each output
        of this request (of each of its params.sequences sequences, told apart by .index).
        Raises KeyError (unknown adapter) or ValueError (bad prompt or parameters, a request
        that can never fit) before anything in the engine changes."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else self.check_prompt(prompt)
        self.check_length(len(ids), params.max_tokens)
        for name, toks in (("stop_token_ids", params.stop_token_ids),
                           ("logit_bias", list(params.logit_bias))):
            bad = [t for t in toks if t >= self.vocab]
            if bad:
                raise ValueError(f"{name}: token ids must be integers in [0, {self.vocab}), got "
                                 f"{bad[:5]}")
        n = params.sequences
        merged = self.adapters.admit([adapter], n)  # ValueError: merged with another
        use_lease = adapter is not None and merged is None
        leases = []
        try:  # whatever fails below leaves no lease and no request counted
            for _ in range(n):
                leases.append(self.adapters.lease(adapter) if use_lease else None)  # KeyError
            seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
            eos = (set() if params.ignore_eos else self.eos) | set(params.stop_token_ids)
            codec = self.codec if self.detokenize else None
            group = [Request("", ids, adapter, lease, params, (seed + i) % 2**63,
                             Detokenizer(codec, params.stop), eos, on_output, index=i)
                     for i, lease in enumerate(leases)]
            with self._lock:
                rid = request_id if request_id is not None else f"req-{next(self._ids)}"
                if rid in self._live:
                    raise ValueError(f"request id {rid!r} is already in use")
                for req in group:
                    req.request_id = rid
                self._live[rid] = list(group)
                self._inbox.append(group)
        except BaseException:
            for lease in leases:
                if lease is not None:
                    self.adapters.release(lease)
            self.adapters.exit(n)
            raise
        return rid

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Ends a request at the next step (finish_reason "abort"): all its sequences, or the
        one of that index. False if it is not live."""
        with self._lock:
            if request_id not in self._live:
                return False
            self._aborts.add((request_id, index))
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting + sum(len(g) for g in self._inbox)

    @property
    def blocks_used(self) -> int:
        return self.allocator.capacity - self.allocator.num_free

    # --- prefix caching ---------------------------------------------------------------------
    def _cache_root(self, req: Request) -> bytes:
        """What a request's KV blocks are keyed by: the model's weights version (merge changes
        the weights in place) and the identity of its adapter: the digest of its tensors
        (never its name, which a different file can take), the merged adapter's, or the base
        model's. Asked when the request first enters, in the stepping thread: the request is
        in flight then, so neither the weights nor its adapter can change under it."""
        if req.lease is not None:
            identity = b"adapter:" + req.lease.kv_identity
        elif self.adapters.merged is not None:
            identity = b"merged:" + self.adapters.entries[self.adapters.merged].kv_identity
        else:
            identity = b"base"
        version = self._model.weights_version.to_bytes(8, "little")
        return hashlib.sha256(b"uora-kv-root-v1\0" + version + identity).digest()

    @property
    def prefix_cache_stats(self) -> dict:
        """Prompt tokens looked up in the prefix cache and found there (counted once per
        request, when it first runs), in total and per adapter name (None: the base)."""
        # copies (atomic): a metrics scrape reads this while the stepping thread counts
        q, h = dict(self.scheduler.cache_queries), dict(self.scheduler.cache_hits)
        return {"queries": sum(q.values()), "hits": sum(h.values()),
                "per_adapter": {name: (q[name], h.get(name, 0)) for name in q},
                "cached_blocks": self.allocator.num_cached, "evicted": self.allocator.evicted}

    def close(self) -> None:
        """Releases what the engine holds outside this process (its share of the KV cache on
        tensor-parallel workers); without it that goes when the runtime closes."""
        flight, self._flight = self._flight, None
        if flight is not None:  # a step still running (its outputs are past every end)
            self._resolve(flight)
        self.runner.close()

    def warmup(self, adapters=(None,), sampled: bool = False) -> float:
        """Captures the decode graphs of every batch bucket up to max_num_seqs (and compiles the
        kernels) with short dummy requests, once per entry of `adapters` (None: no adapter), so
        that live traffic never pays a capture. Needs an idle engine; returns the seconds spent.
        Without CUDA graphs it does nothing."""
        graphs = self.runner.graphs
        if graphs is None:
            return 0.0
        if self.has_unfinished():
            raise RuntimeError("warmup needs an idle engine")
        from uora_rt.engine.graphs import BUCKETS  # CUDA only

        t = time.perf_counter()
        # the dummy requests are no user traffic: the prefix-cache counters (served as metrics)
        # are put back as they were
        counted = dict(self.scheduler.cache_queries), dict(self.scheduler.cache_hits)
        params = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.7 if sampled else 0.0)
        try:
            for adapter in adapters:
                for b in sorted({min(b, self.max_num_seqs) for b in BUCKETS
                                 if b <= graphs.max_bucket}):
                    for i in range(b):  # one-token prompts: one prefill step, one decode step
                        self.add_request([0], adapter, params, request_id=f"warmup-{b}-{i}")
                    self.run_until_done()
        finally:
            self.scheduler.cache_queries, self.scheduler.cache_hits = counted
        return time.perf_counter() - t

    def run_until_done(self) -> dict[str, RequestOutput]:
        """Steps until every request has finished; returns each request's final output."""
        done = {}
        while self.has_unfinished():
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return done
