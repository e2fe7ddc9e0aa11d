"""Which tokens of which requests run in the next step (continuous batching, chunked prefill).

One step computes at most `max_step_tokens` tokens over at most `max_num_seqs` running requests:
1. every running request that needs one token (a decode) first, so no decode ever waits behind
   a long prompt; 2. running requests still prefilling, a chunk each from what budget is left;
3. waiting requests in arrival order, each as far as the budget allows (the rest of a long
prompt is prefilled in later steps). A request enters only when its adapter has a device slot
(pinned while it runs) and the KV blocks for its chunk are free. When a running request needs a
block and none is free, the newest running request is preempted: its blocks are freed and it
waits at the head of the queue to be recomputed (prompt and what it generated so far), so
nothing runs out of memory and nothing is lost. vLLM v1's scheduler is the reference design.

With prefix caching (cache_root given), a request entering looks up its full blocks' keys
(kv_cache.block_keys under cache_root(req)) and starts after the longest cached run, leaving at
least its last token to compute (its logits are needed); it needs KV room only for the blocks it
computes plus the cached ones it takes off the free list. A request whose next block another
running request is computing right now waits a step or more and then reads it, rather than
computing the same block twice. After every step, register() makes the blocks that became full
and computed findable.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from uora_rt.engine.kv_cache import BlockAllocator, block_keys
from uora_rt.engine.request import Request, Status


@dataclass(slots=True)
class ScheduledSeq:
    req: Request
    start: int    # first token of req.tokens computed this step (== req.computed)
    count: int    # tokens computed this step
    sample: bool  # the chunk reaches the last token: a new token is drawn from its logits


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_step_tokens: int, adapters, cache_root=None):
        """cache_root(req) -> bytes: the identity a request's KV is keyed by (None: no prefix
        caching); asked once per request, when it first enters."""
        self.alloc, self.block_size, self.adapters = allocator, block_size, adapters
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.cache_root = cache_root
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0
        # prompt tokens looked up / found cached, per adapter name (None: the base), counted
        # once per request, when it first enters
        self.cache_queries: dict[str | None, int] = {}
        self.cache_hits: dict[str | None, int] = {}

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def schedule(self) -> list[ScheduledSeq]:
        budget, chosen, bs = self.max_step_tokens, {}, self.block_size
        # A sequence whose pending token is its last (max_tokens) ends when that token lands:
        # it is not scheduled again (async scheduling; never the case in a synchronous loop).
        decodes, prefills = [], []
        for r in self.running:
            total = len(r.tokens) + r.pending  # Request.num_tokens, inline: a hot loop
            left = total - r.computed
            if left == 1:
                if not (r.pending and total >= r.max_total):
                    decodes.append(r)
            elif left > 1:
                prefills.append(r)
        preempted = False
        running = Status.RUNNING
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status is not running:  # preempted earlier in this loop
                continue
            computed, total = req.computed, len(req.tokens) + req.pending
            n = min(total - computed, budget)
            need = -(-(computed + n) // bs) - len(req.blocks)
            if need > 0:  # most decodes still have room in their last block
                while need > self.alloc.num_free and req.status is running:
                    victim = self.running[-1]  # the newest; it may already be in this step
                    undone = chosen.pop(victim, None)
                    if undone is not None:
                        budget += undone.count
                    self._preempt(victim)
                    preempted = True
                if req.status is not running:
                    continue
                req.blocks += self.alloc.allocate(need)
            chosen[req] = ScheduledSeq(req, computed, n, computed + n == total)
            budget -= n
        out = list(chosen.values())
        if not preempted:  # admitting new work right after evicting some would thrash
            self._admit(budget, out)
        return out

    def _admit(self, budget: int, out: list[ScheduledSeq]) -> None:
        # skipped: waiting for an adapter slot or for a block another request is computing;
        # later requests may still enter
        skipped = []
        computing = None  # keys running requests are computing; built when first needed
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            if req.pending:  # preempted with a token in flight: it re-enters once that lands
                skipped.append(req)
                continue
            if req.lease is not None and not req.pinned:
                if not self.adapters.pin(req.lease):
                    skipped.append(req)
                    continue
                req.pinned = True
            if req.blocks:  # a forked sequence: holds its prompt's KV (shared full blocks)
                n = min(req.num_tokens - req.computed, budget)
                need = self.blocks_for(req.computed + n) - len(req.blocks)
                if need > self.alloc.num_free:
                    self._unpin(req)
                    self.waiting.appendleft(req)
                    break
                req.blocks += self.alloc.allocate(need)
                self._start(req, req.computed, n, out)
                budget -= n
                continue
            hit, usable = self._lookup(req)
            if len(hit) < usable:
                if computing is None:
                    computing = self._computing()
                if req.keys[len(hit)] in computing:
                    self._unpin(req)
                    skipped.append(req)
                    continue
            start = len(hit) * self.block_size
            n = min(req.num_tokens - start, budget)
            need = self.blocks_for(start + n) - len(hit)
            # arrival order: nobody overtakes the head for KV
            if need + self.alloc.evictable(hit) > self.alloc.num_free:
                self._unpin(req)
                self.waiting.appendleft(req)
                break
            self.alloc.touch(hit)
            req.blocks = hit + self.alloc.allocate(need)
            req.computed, req.cached_blocks = start, len(hit)
            if req.cached_tokens is None:
                self._count(req, start)
            if computing is not None:
                computing.update(req.keys[len(hit):])
            self._start(req, start, n, out)
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _start(self, req: Request, start: int, n: int, out: list[ScheduledSeq]) -> None:
        req.status = Status.RUNNING
        self.running.append(req)
        out.append(ScheduledSeq(req, start, n, start + n == req.num_tokens))

    # --- prefix caching ---------------------------------------------------------------------
    def _keys(self, req: Request) -> list[bytes]:
        if req.cache_root is None:
            req.cache_root = self.cache_root(req)
        return block_keys(req.keys, req.cache_root, req.tokens, self.block_size)

    def _lookup(self, req: Request) -> tuple[list[int], int]:
        """(the cached blocks a waiting request starts from, how many of its blocks could be)."""
        if self.cache_root is None or req.params.prompt_logprobs is not None:
            return [], 0  # prompt logprobs need every prompt position's logits: computed
        usable = (req.num_tokens - 1) // self.block_size  # the last token is always computed
        return self.alloc.lookup(self._keys(req)[:usable]), usable

    def _computing(self) -> set[bytes]:
        """Keys of the full blocks that running requests still prefilling have yet to
        compute (a decoding request completes at most one block per step: not worth it)."""
        return {k for r in self.running if r.num_tokens - r.computed > 1
                for k in r.keys[r.computed // self.block_size:]}

    def _count(self, req: Request, cached: int) -> None:
        req.cached_tokens = min(cached, req.prompt_len)
        name = req.adapter
        self.cache_queries[name] = self.cache_queries.get(name, 0) + req.prompt_len
        self.cache_hits[name] = self.cache_hits.get(name, 0) + req.cached_tokens

    def register(self, req: Request, computed: int | None = None) -> None:
        """The request's blocks that are full and computed (the first `computed` positions,
        default req.computed) become findable; only blocks of tokens the host knows: a key
        hashes token ids."""
        computed = req.computed if computed is None else computed
        full = min(computed, len(req.tokens)) // self.block_size
        if self.cache_root is None or full <= req.cached_blocks:
            return
        keys = self._keys(req)
        for i in range(req.cached_blocks, full):
            self.alloc.register(req.blocks[i], keys[i])
        req.cached_blocks = full

    def register_step(self, scheduled) -> None:
        """register() of a step's running requests up to the positions the step computes. Call
        it once the step's KV is sure to be written: at launch where a step fails at launch or
        not at all, after it ran where it can still fail (the CPU worker). Skips at once the
        requests with no new full block (most, in a decode step)."""
        if self.cache_root is None:
            return
        bs, running = self.block_size, Status.RUNNING
        for s in scheduled:
            r, end = s.req, s.start + s.count
            if r.status is running and min(end, len(r.tokens)) // bs > r.cached_blocks:
                self.register(r, end)

    def _unpin(self, req: Request) -> None:
        if req.pinned:
            self.adapters.unpin(req.lease)
            req.pinned = False

    def _free(self, req: Request) -> None:
        self.alloc.release(req.blocks)
        req.blocks = []
        req.cached_blocks = 0
        self._unpin(req)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.computed = 0
        req.status = Status.WAITING
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request) -> None:
        """Takes a request out (finished or aborted), wherever it is, and frees what it holds."""
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self._free(req)
        req.status = Status.FINISHED

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
