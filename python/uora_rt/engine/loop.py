"""A background thread that steps an engine whenever it has work, and per-request streams.

    loop = EngineLoop(engine).start()
    for out in loop.submit("Hello", adapter="pirate"):        # blocking iteration
        print(out.new_text, end="")
    async for out in loop.submit(prompt, asyncio_loop=asyncio.get_running_loop()):  # asyncio
        ...

Outputs travel from the stepping thread to the consumer through a thread-safe queue (for
asyncio: the event loop's own queue, fed with call_soon_threadsafe), so nothing blocks the
event loop and the engine never waits for a consumer.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading

log = logging.getLogger("uora_rt.engine")


class RequestStream:
    """The outputs of one request, ending with the finished one."""

    def __init__(self, asyncio_loop: asyncio.AbstractEventLoop | None = None):
        self.request_id: str | None = None
        self._loop = asyncio_loop
        self._async_q: asyncio.Queue | None = asyncio.Queue() if asyncio_loop else None
        self._sync_q: queue.SimpleQueue | None = None if asyncio_loop else queue.SimpleQueue()

    def put(self, out) -> None:  # called from the stepping thread
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._async_q.put_nowait, out)
        else:
            self._sync_q.put(out)

    def __iter__(self):
        if self._sync_q is None:
            raise TypeError("this stream belongs to an asyncio loop: use `async for`")
        while True:
            out = self._sync_q.get()
            yield out
            if out.finished:
                return

    async def __aiter__(self):
        if self._async_q is None:
            raise TypeError("this stream has no asyncio loop: iterate it with `for`")
        while True:
            out = await self._async_q.get()
            yield out
            if out.finished:
                return


class EngineLoop:
    def __init__(self, engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="uora-engine", daemon=True)

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
        stream = RequestStream(asyncio_loop)
        stream.request_id = self.engine.add_request(prompt, adapter, params, request_id,
                                                    on_output=stream.put)
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> bool:
        found = self.engine.abort(request_id)
        self._wake.set()
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.engine.has_unfinished():
                try:
                    self.engine.step()
                except Exception:  # step() already fails requests it cannot run; never die
                    log.exception("engine loop: step raised")
            else:
                self._wake.wait(0.1)
                self._wake.clear()
