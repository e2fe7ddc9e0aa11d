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
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from uora_rt.engine.kv_cache import BlockAllocator
from uora_rt.engine.request import Request, Status


@dataclass
class ScheduledSeq:
    req: Request
    start: int    # first token of req.tokens computed this step (== req.computed)
    count: int    # tokens computed this step
    sample: bool  # the chunk reaches the last token: a new token is drawn from its logits


class Scheduler:
    def __init__(self, allocator: BlockAllocator, block_size: int, max_num_seqs: int,
                 max_step_tokens: int, adapters):
        self.alloc, self.block_size, self.adapters = allocator, block_size, adapters
        self.max_num_seqs, self.max_step_tokens = max_num_seqs, max_step_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def schedule(self) -> list[ScheduledSeq]:
        budget, chosen = self.max_step_tokens, {}
        decodes = [r for r in self.running if r.num_tokens - r.computed == 1]
        prefills = [r for r in self.running if r.num_tokens - r.computed > 1]
        preempted = False
        for req in decodes + prefills:
            if budget == 0:
                break
            if req.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(req.num_tokens - req.computed, budget)
            need = self.blocks_for(req.computed + n) - len(req.blocks)
            while need > self.alloc.num_free and req.status is Status.RUNNING:
                victim = self.running[-1]  # the newest; it may already be in this step
                undone = chosen.pop(victim, None)
                if undone is not None:
                    budget += undone.count
                self._preempt(victim)
                preempted = True
            if req.status is not Status.RUNNING:
                continue
            req.blocks += self.alloc.allocate(need)
            chosen[req] = ScheduledSeq(req, req.computed, n, req.computed + n == req.num_tokens)
            budget -= n
        out = list(chosen.values())
        if not preempted:  # admitting new work right after evicting some would thrash
            self._admit(budget, out)
        return out

    def _admit(self, budget: int, out: list[ScheduledSeq]) -> None:
        skipped = []  # waiting for an adapter slot: later requests may still enter
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            if req.lease is not None and not req.pinned:
                if not self.adapters.pin(req.lease):
                    skipped.append(req)
                    continue
                req.pinned = True
            n = min(req.num_tokens - req.computed, budget)
            need = self.blocks_for(req.computed + n) - len(req.blocks)
            if need > self.alloc.num_free:  # arrival order: nobody overtakes the head for KV
                self._unpin(req)
                self.waiting.appendleft(req)
                break
            req.blocks += self.alloc.allocate(need)
            req.status = Status.RUNNING
            self.running.append(req)
            out.append(ScheduledSeq(req, req.computed, n, req.computed + n == req.num_tokens))
            budget -= n
        self.waiting.extendleft(reversed(skipped))

    def _unpin(self, req: Request) -> None:
        if req.pinned:
            self.adapters.unpin(req.lease)
            req.pinned = False

    def _free(self, req: Request) -> None:
        self.alloc.release(req.blocks)
        req.blocks = []
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
