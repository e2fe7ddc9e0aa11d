"""Engine.step: one scheduler iteration, synchronous or overlapped with the next (async
scheduling, the default).

Synchronous: schedule step N, build its metadata, run it, copy its tokens to the host, append
them, check stops, build the outputs; only then schedule step N + 1.

Async: step() schedules and launches step N + 1 while step N is still running, then learns step
N's tokens and builds its outputs while step N + 1 runs. Step N's tokens stay on the device and
become step N + 1's decode inputs there (runner.launch); the scheduler counts each running
sequence's token still in flight (Request.pending) for positions and KV blocks. A sequence
found finished at step N (end of sequence, stop string, max_tokens, abort) has one more token
computed in step N + 1: it is discarded and its blocks are already free (stats
"discarded_tokens"); a sequence whose pending token is its max_tokens-th is not scheduled again.
Outputs are those of the synchronous loop, one step() later. A step that cannot overlap runs
synchronously and says why once in the log; stats["sync_<cause>"] counts them.
"""

from __future__ import annotations

import logging
import time

from uora_rt.engine.forks import fork
from uora_rt.engine.metadata import build_step
from uora_rt.engine.processors import hand_out
from uora_rt.engine.request import Request, RequestOutput, Status
from uora_rt.engine.runner import InFlight

log = logging.getLogger("uora_rt.engine")

SYNC_CAUSES = {
    "tensor_parallel": "tensor parallelism (the workers get each step's token ids from the host)",
    "extras": "logit processing or logprobs (penalty histories and logprob tables need the "
              "exact tokens on the host)",
    "device_window": "top-k / top-p on the device sampler (a row its window cannot decide is "
                     "re-drawn on the host)",
    "fork": "n > 1 at the moment the sequences fork (the prompt's KV is copied on the host's "
            "order)",
    "abort": "an abort of a sequence with a token in flight (the token is delivered first, as "
             "the synchronous loop does)",
}


class Stepping:
    """The step loop of Engine (mixed in; the state lives on the engine)."""

    def step(self) -> list[RequestOutput]:
        """One scheduler iteration: one output per sequence that produced a token or ended (with
        async scheduling, the tokens of the step launched by the previous call)."""
        t0 = time.perf_counter()
        with self._lock:
            new, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, set()
        for group in new:
            self._enter(group)
        outputs = []
        prev, self._flight = self._flight, None
        hit = [req for rid, index in aborts for req in list(self._live.get(rid, ()))
               if req.status is not Status.FINISHED and index in (None, req.index)]
        if prev is not None and any(req.pending for req in hit):
            self._count_sync("abort")
            outputs += self._resolve(prev)
            prev = None
        outputs += [self._finish(req, "abort") for req in hit if req.status is not Status.FINISHED]
        scheduled = self.scheduler.schedule()
        if not scheduled:
            if prev is not None:
                outputs += self._resolve(prev)
            return outputs
        self.stats["peak_blocks"] = max(self.stats["peak_blocks"], self.blocks_used)
        try:
            meta = build_step(scheduled, self.block_size, self.runner.device,
                              self.adapters.merged is None, self.runner.gather_prefill,
                              self._rows)
            cause = None
            if self.async_scheduling:
                cause = self.runner.sync_cause(meta) or next(
                    ("fork" for s in scheduled if s.req.forks and
                     s.start + s.count >= s.req.prompt_len - 1), None)
                rows = {s.req: i for i, s in enumerate(prev.meta.sampled)} if prev else {}
                flight = self.runner.launch(meta, prev, [rows[r] for r in meta.feed_reqs],
                                            sync=cause is not None)
            else:
                flight = InFlight(meta)  # run in _resolve, in this thread
        except Exception as e:  # fail the step's requests, keep serving the others
            log.exception("engine step failed; failing its %d requests", len(scheduled))
            if prev is not None:
                outputs += self._resolve(prev)
            return outputs + [self._finish(s.req, "abort", f"{type(e).__name__}: {e}")
                              for s in scheduled if s.req.status is not Status.FINISHED]
        flight.scheduled = scheduled
        stats, decode, prefill = self.stats, 0, 0
        for s in scheduled:
            r, n = s.req, s.count
            r.computed += n
            r.pending += s.sample
            if n == 1 and s.start >= r.prompt_len:
                decode += 1
            else:
                prefill += n
        stats["decode_tokens"] += decode
        stats["prefill_tokens"] += prefill
        if prev is not None:
            outputs += self._resolve(prev)
        if not self.async_scheduling or cause is not None:
            if cause is not None:
                self._count_sync(cause)
            outputs += self._resolve(flight, sync=True)
        else:
            if flight.future is None:
                # its inputs are all known now: the same blocks sync registers. A CUDA step that
                # fails does so at launch (or leaves the device unusable), before this point
                self.scheduler.register_step(scheduled)
            # else the CPU worker's step can still fail: its blocks become findable once it ran
            self._flight = flight
            if not self._live:  # everything ended: what runs now is discarded; finish it
                outputs += self._resolve(flight)
                self._flight = None
        stats["steps"] += 1
        stats["step_s"] += time.perf_counter() - t0
        return outputs

    def _count_sync(self, cause: str) -> None:
        key = f"sync_{cause}"
        if not self.stats[key]:
            log.info("async scheduling: a step runs synchronously: %s; later ones are counted in "
                     "Engine.stats[%r]", SYNC_CAUSES[cause], key)
        self.stats[key] += 1

    def _resolve(self, flight: InFlight, sync: bool = False) -> list[RequestOutput]:
        """Waits for a launched step and turns its tokens into outputs (sync: it ran in this
        call, so its blocks are registered and its forks made here)."""
        meta, scheduled = flight.meta, flight.scheduled
        t = time.perf_counter()
        try:
            if flight.future is None and flight.event is None and flight.done is None:
                tokens, table = self.runner.run(meta)  # the synchronous loop
                flight.run_s = time.perf_counter() - t
            else:
                tokens, table = flight.result()
            tokens = tokens.tolist()
            table = table.tolist() if table is not None else None
        except Exception as e:  # fail the step's requests, keep serving the others
            log.exception("engine step failed; failing its %d requests", len(scheduled))
            for s in meta.sampled:
                s.req.pending -= 1
            return [self._finish(s.req, "abort", f"{type(e).__name__}: {e}")
                    for s in scheduled if s.req.status is not Status.FINISHED]
        self.stats["forward_s"] += time.perf_counter() - t  # the host waiting for the step
        self.stats["run_s"] += flight.run_s or 0.0
        for s in meta.sampled:
            s.req.pending -= 1
        if sync or flight.future is not None:
            self.scheduler.register_step(scheduled)
        if sync:
            for s in scheduled:
                r = s.req
                if r.forks and r.status is Status.RUNNING and r.computed >= r.prompt_len - 1:
                    fork(r, self.scheduler, self.allocator, self.kv, self.stats)
        entries = hand_out(meta.extras, table, tokens) if table is not None else None
        return self._outputs(meta.sampled, tokens, entries)

    def _outputs(self, sampled: list, tokens: list[int], entries) -> list[RequestOutput]:
        """The step's outputs, in one pass over its sampled rows: each row's token is appended
        and checked against the sequence's end-of-sequence / stop token ids, stop strings and
        max_tokens; an output shares the sequence's lists instead of copying them
        (RequestOutput.sharing), so a step costs O(1) per sequence, not O(its length)."""
        outputs, emit, finish, sharing = [], self._emit, self._finish, RequestOutput.sharing
        append = outputs.append
        done, discarded = Status.FINISHED, 0
        for i, (s, tok) in enumerate(zip(sampled, tokens)):
            r = s.req
            if r.status is done:  # ended at the step before: a token past its end
                discarded += 1
                continue
            if r.first_token_time is None:
                r.first_token_time = time.perf_counter()
            new_lp = None
            if entries:
                entry = entries.get(i)
                if entry is not None:
                    r.logprobs.append(entry)
                    r.cumulative_logprob += entry.logprob
                    new_lp = [entry]
            if tok in r.eos:
                r.stop_reason = tok
                append(finish(r, "stop", new_lp=new_lp))
                continue
            r.tokens.append(tok)
            detok = r.detok
            if detok.stream is not None and detok.push(tok):
                r.stop_reason = detok.matched
                append(finish(r, "stop", new=[tok], new_lp=new_lp))
            elif len(r.tokens) >= r.max_total:
                append(finish(r, "length", new=[tok], new_lp=new_lp))
            elif r.plain and r.on_output is None and detok.stream is None:
                # the usual row (offline, or the engine core's): no text, logprobs or callback
                append(sharing(r.request_id, r.adapter, r.tokens, r.prompt_len, len(r.tokens),
                               "", False, None, r.prompt_len, [tok], "", r.seed, None, None,
                               r.index, None, None, None, None, r.cached_tokens or 0))
            else:
                append(emit(r, [tok], new_lp))
        if discarded:
            self.stats["discarded_tokens"] += discarded
        return outputs

    def _enter(self, group: list[Request]) -> None:
        """A new request's sequences: the first is scheduled; the others wait for its prompt's
        KV cache (forks.fork), except under tensor parallelism (the cache lives on the workers
        too), where each prefills its own prompt."""
        for req in group:
            if req.params.processed:
                req.proc_slot = self.runner.processors.open(req.tokens, req.prompt_len,
                                                            req.params, req.eos)
        first, *rest = group
        self.scheduler.add(first)
        if rest and self.runner.peers is not None:
            if not self._said_tp_forks:
                log.info("n > 1 under tensor parallelism: each sequence prefills its prompt")
                self._said_tp_forks = True
            for req in rest:
                self.scheduler.add(req)
            self.stats["fork_prefills"] += len(rest)
        else:
            first.forks = rest

    def _finish(self, req: Request, reason: str, error: str | None = None,
                new: list[int] | None = None, new_lp=None) -> RequestOutput:
        self.scheduler.finish(req)
        if req.lease is not None:
            self.adapters.release(req.lease)
        if req.proc_slot is not None:
            self.runner.processors.close(req.proc_slot)
            req.proc_slot = None
        req.finish_reason, req.error = reason, error
        with self._lock:
            seqs = self._live.get(req.request_id)
            if seqs is not None and req in seqs:
                seqs.remove(req)
                if not seqs:
                    del self._live[req.request_id]
        self.adapters.exit()
        out = self._emit(req, new or [], new_lp)
        for kid in req.forks:  # siblings still waiting for this one's prompt fail with it
            if kid.status is not Status.FINISHED:
                self._finish(kid, reason, error)
        req.forks = []
        return out

    def _emit(self, req: Request, new: list[int], new_lp=None) -> RequestOutput:
        done = req.status is Status.FINISHED
        lp = req.logprobs if req.want_logprobs else None
        prompt_lp = req.prompt_logprobs
        if prompt_lp is not None and len(prompt_lp) != req.prompt_len:
            prompt_lp = None  # not all computed yet
        detok = req.detok
        out = RequestOutput.sharing(
            req.request_id, req.adapter, req.tokens, req.prompt_len, len(req.tokens), detok.text,
            done, req.finish_reason, req.prompt_len, new,
            detok.take_new(done) if detok.stream is not None else "", req.seed, req.error,
            req.stop_reason, req.index, lp, (new_lp or []) if lp is not None else None, prompt_lp,
            req.cumulative_logprob if lp is not None else None, req.cached_tokens or 0)
        if req.on_output is not None:
            try:
                req.on_output(out)
            except Exception:  # a consumer's failure must not stop the engine
                log.exception("on_output of %s failed", req.request_id)
        return out
