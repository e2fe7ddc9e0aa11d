"""A front end's handle on an engine core in another process (engine/core.py): the interface of
the in-process EngineLoop (submit -> a stream of RequestOutputs, abort), plus the core's limits
and adapters, across the process boundary.

The front end keeps the text side: its own tokenizer (from the base's folder, which the core
names when it says Ready), one incremental detokenizer per request, and the stop strings (a
request whose text reaches one ends here at once and is aborted in the core). The core sends
token ids only. If the core process dies, every stream ends with an error at once, `healthy`
turns False and on_dead runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import random
from pathlib import Path

import zmq
import zmq.asyncio

from uora_rt.engine.core import process_alive
from uora_rt.engine.detokenizer import Detokenizer
from uora_rt.engine.messages import (
    ENCODER, FINISH_REASONS, TO_FRONT_END, Abort, Accepted, AdapterError, AdapterOp, Hello,
    Ready, Reject, Reply, Shutdown, Step, Submit)
from uora_rt.engine.request import RequestOutput, SamplingParams, TokenLogprob
from uora_rt.engine.rules import Limits, Prompts, RequestRules

log = logging.getLogger("uora_rt.engine")

CORE_GONE = "the engine core stopped"


class CoreGone(RuntimeError):
    """The engine core process is not running (any more)."""


class Stream:
    """The outputs of one request (of each of its sequences, told apart by .index), ending
    when every sequence has finished (`async for`)."""

    def __init__(self, request_id: str, sequences: int = 1):
        self.request_id, self.sequences = request_id, sequences
        self._q: asyncio.Queue = asyncio.Queue()

    async def __aiter__(self):
        left = self.sequences
        while left:
            out = await self._q.get()
            yield out
            left -= out.finished


def _logprob(t) -> TokenLogprob:
    return TokenLogprob(t.token_id, t.logprob, t.rank, [tuple(x) for x in t.top])


class _Tracked:
    """One sequence as its front end sees it: the tokens, text and logprobs so far."""

    __slots__ = ("rid", "index", "adapter", "prompt_len", "params", "tokens", "detok",
                 "stream", "logprobs", "prompt_logprobs", "cumulative", "cached")

    def __init__(self, rid, index, adapter, prompt_len, params, detok, stream):
        self.rid, self.index, self.adapter = rid, index, adapter
        self.prompt_len, self.params = prompt_len, params
        self.tokens: list[int] = []
        self.detok, self.stream = detok, stream
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None or \
            params.sequences > params.n else None
        self.prompt_logprobs = None
        self.cumulative, self.cached = 0.0, 0

    def output(self, new, finished, reason, error=None, stop_reason=None,
               new_lp=None) -> RequestOutput:
        lp = self.logprobs
        return RequestOutput.sharing(
            self.rid, self.adapter, self.tokens, 0, len(self.tokens), self.detok.text, finished,
            reason, self.prompt_len, new, self.detok.take_new(finished), self.params.seed, error,
            stop_reason, self.index, lp, (new_lp or []) if lp is not None else None,
            self.prompt_logprobs, self.cumulative if lp is not None else None, self.cached)


class CoreClient(RequestRules):
    """address: the core's socket; core_pid: its process, watched so that a dead core is
    noticed within `watch_s`; on_dead(): called once when it is."""

    def __init__(self, address: str, core_pid: int | None = None, on_dead=None,
                 watch_s: float = 0.2):
        self.address, self.core_pid, self.on_dead, self.watch_s = (
            address, core_pid, on_dead, watch_s)
        self.ready: Ready | None = None
        self.limits: Limits | None = None
        self.prompts: Prompts | None = None
        self.stats = None
        self.adapters: list = []
        self.healthy = False
        self._gone = False
        self._live: dict[str, list[_Tracked | None]] = {}  # request id -> its sequences
        self._acks: dict[str, asyncio.Future] = {}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._seeds = random.Random()
        self._tasks: list[asyncio.Task] = []
        self._sock = None
        self._since_stats = 0  # requests submitted since the core last sent its counts

    # --- lifetime ---------------------------------------------------------------------------
    async def connect(self, timeout: float = 60.0) -> "CoreClient":
        ctx = zmq.asyncio.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.address)
        ready = asyncio.get_running_loop().create_future()
        self._calls[-1] = ready
        self._tasks = [asyncio.ensure_future(self._receive())]
        if self.core_pid is not None:
            self._tasks.append(asyncio.ensure_future(self._watch()))
        # The send waits until the core's socket is there; a core that dies first fails
        # `ready` (the watcher), which must end the wait, so the two race.
        hello = asyncio.ensure_future(self._sock.send(ENCODER.encode(Hello(os.getpid()))))
        try:
            msg: Ready = await asyncio.wait_for(ready, timeout)
        except asyncio.TimeoutError:
            raise CoreGone(f"the engine core at {self.address} did not answer within "
                           f"{timeout:.0f} s") from None
        finally:
            hello.cancel()
        self.ready, self.stats, self.adapters = msg, msg.stats, msg.adapters
        self.limits = Limits(msg.vocab, msg.max_model_len, msg.kv_capacity_tokens)
        codec = None
        if msg.folder and (Path(msg.folder) / "tokenizer.json").is_file():
            from uora_rt.models.tokenizer import TextCodec

            codec = TextCodec(msg.folder)
        self.prompts = Prompts(codec, self.limits)
        self.codec, self.max_model_len, self.eos = codec, msg.max_model_len, set(msg.eos)
        self.healthy = True
        return self

    async def start(self) -> None:
        if self.ready is None:
            await self.connect()

    @property
    def folder(self) -> str | None:
        return self.ready.folder if self.ready is not None else None

    @property
    def waiting(self) -> int:
        """Requests accepted and not running yet, as far as this front end can tell: the core's
        last count plus what was submitted since (and what is being submitted)."""
        return self.stats.waiting + self._since_stats + len(self._acks)

    def close(self, shutdown_core: bool = False) -> None:
        if shutdown_core and self._sock is not None and self.healthy:
            self._sock.send(ENCODER.encode(Shutdown()))
        for t in self._tasks:
            t.cancel()
        if self._sock is not None:
            self._sock.close()

    # --- requests -----------------------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], adapter: str | None, params: SamplingParams,
                     request_id: str) -> Stream:
        """Queues a request in the core; KeyError (unknown adapter) or ValueError (refused)
        as Engine.add_request raises them, CoreGone when the core is not running."""
        if not self.healthy:
            raise CoreGone(CORE_GONE)
        if request_id in self._live:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.seed is None:  # drawn here, so the request stays reproducible from its output
            params = dataclasses.replace(params, seed=self._seeds.getrandbits(63))
        codec = self.prompts.codec
        n = params.sequences
        stream = Stream(request_id, n)
        self._live[request_id] = [
            _Tracked(request_id, i, adapter, len(prompt_ids), dataclasses.replace(
                params, seed=(params.seed + i) % 2**63), Detokenizer(codec, params.stop), stream)
            for i in range(n)]
        ack = asyncio.get_running_loop().create_future()
        self._acks[request_id] = ack
        await self._sock.send(ENCODER.encode(Submit(request_id, list(prompt_ids), adapter,
                                                    dataclasses.asdict(params))))
        try:
            await ack
        except BaseException:
            self._live.pop(request_id, None)
            raise
        self._since_stats += 1
        return stream

    def abort(self, request_id: str) -> bool:
        """Ends a request now (finish_reason "abort": each sequence still running) and tells the
        core."""
        seqs = self._live.pop(request_id, None)
        if seqs is None:
            return False
        for t in seqs:
            if t is not None:
                t.stream._q.put_nowait(t.output([], True, "abort"))
        self._send_soon(Abort([request_id], [-1]))
        return True

    def _send_soon(self, msg) -> None:
        if self.healthy:
            asyncio.ensure_future(self._sock.send(ENCODER.encode(msg)))

    # --- adapters -----------------------------------------------------------------------------
    async def adapter_op(self, op: str, name: str, path: str | None = None) -> None:
        """Loads or unloads an adapter in the core; AdapterError(status, message) if refused."""
        if not self.healthy:
            raise CoreGone(CORE_GONE)
        call_id = next(self._call_ids)
        fut = asyncio.get_running_loop().create_future()
        self._calls[call_id] = fut
        await self._sock.send(ENCODER.encode(AdapterOp(call_id, op, name, path)))
        reply: Reply = await fut
        self.adapters = reply.adapters
        if reply.status != 200:
            raise AdapterError(reply.status, reply.error)

    def adapter_names(self) -> set[str]:
        return {c.name for c in self.adapters}

    # --- messages in ----------------------------------------------------------------------------
    async def _receive(self) -> None:
        while True:
            raw = await self._sock.recv()
            try:
                msg = TO_FRONT_END.decode(raw)
                self._dispatch(msg)
            except Exception:  # one bad message must not end every stream
                log.exception("front end: a message from the engine core failed")

    def _dispatch(self, msg) -> None:
        if isinstance(msg, Step):
            self.stats, self._since_stats = msg.stats, 0
            self._step(msg)
        elif isinstance(msg, Accepted):
            for rid in msg.request_ids:
                fut = self._acks.pop(rid, None)
                if fut is not None and not fut.done():
                    fut.set_result(True)
        elif isinstance(msg, Reject):
            fut = self._acks.pop(msg.request_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(KeyError(msg.error) if msg.status == 404
                                  else ValueError(msg.error))
        elif isinstance(msg, Reply):
            fut = self._calls.pop(msg.call_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, Ready):
            fut = self._calls.pop(-1, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _step(self, msg: Step) -> None:
        errors = dict(msg.errors)
        lps = dict(msg.logprobs)
        prompt_lps = dict(msg.prompt_logprobs)
        for row, rid in enumerate(msg.request_ids):
            seqs = self._live.get(rid)
            t = None if seqs is None else seqs[msg.index[row]]
            if t is None:  # ended here already (a stop string, an abort)
                continue
            t.cached = msg.cached[row]
            if row in prompt_lps:
                t.prompt_logprobs = [None if x is None else _logprob(x) for x in prompt_lps[row]]
            new_lp = [_logprob(x) for x in lps.get(row, ())]
            if t.logprobs is not None:
                t.logprobs += new_lp
                for x in new_lp:
                    t.cumulative += x.logprob
            new, out = [], None
            for tok in msg.tokens[row]:
                t.tokens.append(tok)
                new.append(tok)
                if t.detok.push(tok):  # a stop string: done here, the core stops next step
                    out = t.output(new, True, "stop", stop_reason=t.detok.matched,
                                   new_lp=new_lp)
                    self._send_soon(Abort([rid], [t.index]))
                    break
            if out is None:
                code = msg.finish[row]
                stop = msg.stop_token[row]
                out = t.output(new, code != 0, FINISH_REASONS[code], errors.get(row),
                               stop if stop >= 0 else None, new_lp)
            if out.finished:
                seqs[t.index] = None
                if all(x is None for x in seqs):
                    del self._live[rid]
            t.stream._q.put_nowait(out)

    # --- the core's health ------------------------------------------------------------------------
    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watch_s)
            if not process_alive(self.core_pid):
                self._core_died()
                return

    def _core_died(self) -> None:
        if self._gone:  # (not `healthy`: that is False until Ready, and a core can die first)
            return
        self._gone, self.healthy = True, False
        log.error("front end: %s; failing %d requests in flight", CORE_GONE, len(self._live))
        for seqs in self._live.values():
            for t in seqs:
                if t is not None:
                    t.stream._q.put_nowait(t.output([], True, "abort", CORE_GONE))
        self._live.clear()
        for fut in list(self._acks.values()) + list(self._calls.values()):
            if not fut.done():
                fut.set_exception(CoreGone(CORE_GONE))
        self._acks.clear()
        self._calls.clear()
        if self.on_dead is not None:
            self.on_dead()

