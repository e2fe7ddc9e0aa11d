"""A background thread that steps an engine whenever it has work, and per-request streams.

    loop = EngineLoop(engine).start()
    for out in loop.submit("Hello", adapter="pirate"):        # blocking iteration
        print(out.new_text, end="")
    async for out in loop.submit(prompt, asyncio_loop=asyncio.get_running_loop()):  # asyncio
        ...

Outputs travel from the stepping thread to the consumer through a thread-safe queue (for
asyncio: the event loop's own queue, fed with call_soon_threadsafe), so nothing blocks the
event loop and the engine never waits for a consumer. Asyncio outputs of one step go over in
one call_soon_threadsafe per event loop, not one per request: each such call writes the loop's
wake-up pipe, and at a few hundred streams per step those wake-ups cost the stepping thread
(which shares the GIL with the loop) measurable time.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

log = logging.getLogger("uora_rt.engine")


class RequestStream:
    """The outputs of one request, ending once each of its `sequences` has finished."""

    def __init__(self, asyncio_loop: asyncio.AbstractEventLoop | None = None, sink=None,
                 sequences: int = 1):
        """sink(loop, queue, out), if given, collects asyncio outputs for a batched hand-over
        (EngineLoop's); without one each output is handed over on its own."""
        self.request_id: str | None = None
        self.sequences = sequences
        self._loop, self._sink = asyncio_loop, sink
        self._async_q: asyncio.Queue | None = asyncio.Queue() if asyncio_loop else None
        self._sync_q: queue.SimpleQueue | None = None if asyncio_loop else queue.SimpleQueue()

    def put(self, out) -> None:  # called from the stepping thread
        if self._loop is None:
            self._sync_q.put(out)
        elif self._sink is not None:
            self._sink(self._loop, self._async_q, out)
        else:
            self._loop.call_soon_threadsafe(self._async_q.put_nowait, out)

    def __iter__(self):
        if self._sync_q is None:
            raise TypeError("this stream belongs to an asyncio loop: use `async for`")
        left = self.sequences
        while True:
            out = self._sync_q.get()
            yield out
            left -= out.finished
            if not left:
                return

    async def __aiter__(self):
        if self._async_q is None:
            raise TypeError("this stream has no asyncio loop: iterate it with `for`")
        left = self.sequences
        while True:
            out = await self._async_q.get()
            yield out
            left -= out.finished
            if not left:
                return


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uora-engine", daemon=True)
        self._outbox: dict = {}  # event loop -> [(queue, output)] of the current step

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """The stepping thread runs (False before start() and after stop())."""
        return self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def submit(self, prompt, adapter=None, params=None, request_id=None,
               asyncio_loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """Adds a request (errors raised here, as Engine.add_request) and returns its stream."""
        stream = RequestStream(asyncio_loop, self._collect,
                               params.sequences if params is not None else 1)
        stream.request_id = self.engine.add_request(prompt, adapter, params, request_id,
                                                    on_output=stream.put)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        found = self.engine.abort(request_id)
        self._wake.set()
        return found

    def _collect(self, loop, q, out) -> None:  # stepping thread only
        self._outbox.setdefault(loop, []).append((q, out))

    def _flush(self) -> None:
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is left to read them
                log.warning("engine loop: %d outputs for a closed event loop dropped", len(items))

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.engine.has_unfinished():
                try:
                    self.engine.step()
                except Exception:  # step() already fails requests it cannot run; never die
                    log.exception("engine loop: step raised")
                self._flush()
            else:
                self._wake.wait(0.1)
                self._wake.clear()


def _deliver(items) -> None:  # on the event loop
    for q, out in items:
        q.put_nowait(out)
