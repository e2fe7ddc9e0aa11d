"""The engine core in its own process: scheduler, adapters, KV cache, model runner and sampler,
stepping as fast as the device allows, with no HTTP, JSON or text in the way.

Front ends (server processes) talk to it over one ZeroMQ ROUTER socket (engine/messages.py):
requests in; after each step, for each front end, ONE message with every output of that step
that belongs to it, as columns. Between steps the core takes everything that arrived (never
blocking while requests run; while idle it waits for the next message). Text is the front
ends' business: the core sends token ids, and a front end that sees a stop string aborts the
request.
"""

from __future__ import annotations

import logging
import time

import zmq

from uora_rt.engine.messages import (
    ENCODER, TO_CORE, Abort, Accepted, AdapterError, AdapterOp, Hello, Logprob, Ready, Reject,
    Reply, Shutdown, Stats, Step, Submit)
from uora_rt.engine.request import SamplingParams

log = logging.getLogger("uora_rt.engine")

_CODES = {None: 0, "stop": 1, "length": 2, "abort": 3}


class EngineCore:
    """engine: an Engine built with detokenize=False. admin: load(name, path), unload(name)
    change the runtime's adapters (AdapterError/ValueError/OSError/KeyError on a refusal);
    cards() lists the loaded adapters as AdapterCards (server.adapters.AdapterAdmin)."""

    def __init__(self, engine, address: str, admin, folder=None):
        self.engine, self.address, self.admin = engine, address, admin
        self.folder = folder
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.bind(address)
        self.owner: dict[str, bytes] = {}  # request id -> the front end that sent it
        self.unfinished: dict[str, int] = {}  # request id -> its sequences still running
        self.prompt_lp_sent: set[tuple[str, int]] = set()
        self.clients: dict[bytes, int] = {}  # front end -> its process id
        self._checked = time.monotonic()
        self.stopping = False
        self._idle_stats_sent = True

    # --- messages in ----------------------------------------------------------------------------
    def _drain(self, timeout_ms: int) -> None:
        """Handles every message that has arrived; waits up to timeout_ms for the first."""
        if not self.sock.poll(timeout_ms):
            return
        self._accepted: dict[bytes, list[str]] = {}
        while True:
            try:
                ident, raw = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = TO_CORE.decode(raw)
            except Exception as e:  # a front end of another version: say so, keep serving
                log.error("engine core: undecodable message from a front end: %s", e)
                continue
            self._handle(ident, msg)
        for ident, ids in self._accepted.items():
            self._send(ident, Accepted(ids))

    def _handle(self, ident: bytes, msg) -> None:
        e = self.engine
        if isinstance(msg, Submit):
            try:
                params = SamplingParams(**msg.params)
                e.add_request(msg.prompt, msg.adapter, params, msg.request_id)
                self.owner[msg.request_id] = ident
                self.unfinished[msg.request_id] = params.sequences
                self._accepted.setdefault(ident, []).append(msg.request_id)
            except KeyError as err:
                self._send(ident, Reject(msg.request_id, 404, str(err.args[0] if err.args
                                                                 else err)))
            except (ValueError, TypeError) as err:
                self._send(ident, Reject(msg.request_id, 400, str(err)))
        elif isinstance(msg, Abort):
            for rid, index in zip(msg.request_ids, msg.index):
                e.abort(rid, None if index < 0 else index)
        elif isinstance(msg, AdapterOp):
            self._adapter_op(ident, msg)
        elif isinstance(msg, Hello):
            self.clients[ident] = msg.pid
            self._send(ident, Ready(e.limits.vocab, e.max_model_len, e.kv_capacity_tokens,
                                    sorted(e.eos), self.admin.cards(), self.stats(),
                                    None if self.folder is None else str(self.folder),
                                    e.runner.graphs is not None))
        elif isinstance(msg, Shutdown):
            self.stopping = True

    def _adapter_op(self, ident: bytes, msg: AdapterOp) -> None:
        status, error = 200, None
        try:
            if msg.op == "load":
                self.admin.load(msg.name, msg.path)
            elif msg.op == "unload":
                self.admin.unload(msg.name)
            else:
                status, error = 400, f"unknown adapter operation {msg.op!r}"
        except AdapterError as err:
            status, error = err.status, str(err)
        except KeyError as err:
            status, error = 404, str(err.args[0] if err.args else err)
        except (ValueError, OSError) as err:
            status, error = 400, str(err)
        except Exception as err:  # a bug of ours: the front end answers 500, the core lives on
            log.exception("engine core: adapter %s of %r failed", msg.op, msg.name)
            status, error = 500, f"{type(err).__name__}: {err}"
        self._send(ident, Reply(msg.call_id, status, error, self.admin.cards()))

    # --- messages out ---------------------------------------------------------------------------
    def _send(self, ident: bytes, msg) -> None:
        try:
            self.sock.send_multipart([ident, ENCODER.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:  # a front end that went away: nothing to deliver to
            log.warning("engine core: a front end is unreachable (%s)", e)

    def stats(self) -> Stats:
        return Stats.of(self.engine)

    def _publish(self, outputs) -> None:
        """One Step message per front end with rows in this step's outputs."""
        per: dict[bytes, Step] = {}
        stats = self.stats()
        for out in outputs:
            rid = out.request_id
            ident = self.owner.get(rid)
            if ident is None:
                continue
            step = per.get(ident)
            if step is None:
                step = per[ident] = Step.empty(stats)
            row = len(step.request_ids)
            step.request_ids.append(rid)
            step.index.append(out.index)
            step.tokens.append(out.new_token_ids)
            step.finish.append(_CODES[out.finish_reason] if out.finished else 0)
            step.stop_token.append(out.stop_reason if isinstance(out.stop_reason, int) else -1)
            step.cached.append(out.cached_tokens)
            if out.error is not None:
                step.errors.append((row, out.error))
            if out.new_logprobs:
                step.logprobs.append((row, [_wire(t) for t in out.new_logprobs]))
            if out.prompt_logprobs is not None and (rid, out.index) not in self.prompt_lp_sent:
                self.prompt_lp_sent.add((rid, out.index))
                step.prompt_logprobs.append((row, [None if t is None else _wire(t)
                                                   for t in out.prompt_logprobs]))
            if out.finished:
                self.prompt_lp_sent.discard((rid, out.index))
                self.unfinished[rid] -= 1
                if self.unfinished[rid] == 0:
                    del self.owner[rid], self.unfinished[rid]
        for ident, step in per.items():
            self._send(ident, step)

    # --- the loop ---------------------------------------------------------------------------
    def _reap_front_ends(self) -> None:
        """A front end process that died leaves requests nobody reads: abort them."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        self._checked = now
        for ident, pid in list(self.clients.items()):
            if not process_alive(pid):
                del self.clients[ident]
                orphans = [rid for rid, who in self.owner.items() if who == ident]
                log.warning("engine core: a front end (pid %d) is gone; aborting its %d "
                            "requests", pid, len(orphans))
                for rid in orphans:
                    self.engine.abort(rid)

    def run(self) -> None:
        e = self.engine
        while True:
            busy = e.has_unfinished()
            self._drain(0 if busy else 100)
            self._reap_front_ends()
            if self.stopping:
                return self._shut_down()
            if e.has_unfinished():
                self._idle_stats_sent = False
                self._publish(e.step())
            elif not self._idle_stats_sent:  # so the front ends' gauges read idle
                self._idle_stats_sent = True
                empty = Step.empty(self.stats())
                for ident in self.clients:
                    self._send(ident, empty)

    def _shut_down(self, timeout_s: float = 5.0) -> None:
        """Aborts what still runs (its front ends get the final outputs) and closes."""
        e = self.engine
        with e._lock:
            live = list(e._live)
        for rid in live:
            e.abort(rid)
        deadline = time.monotonic() + timeout_s
        while e.has_unfinished() and time.monotonic() < deadline:
            self._publish(e.step())
        self.sock.close()


def _wire(t) -> Logprob:
    return Logprob(t.token_id, t.logprob, t.rank, t.top)


def process_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not). Linux /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
