"""The engine in the server's own process, behind the interface the server uses for an engine
core in another process (engine/client.CoreClient): for tests that reach into the engine, and for
embedding the server in a program that already holds a runtime. `uora-rt serve` runs the split.
"""

from __future__ import annotations

import asyncio

from uora_rt.engine import EngineLoop
from uora_rt.engine.messages import AdapterCard, AdapterError, Stats
from uora_rt.engine.rules import RequestRules
from uora_rt.server.adapters import AdapterAdmin


class LocalEngine(RequestRules):
    def __init__(self, rt, engine):
        self.rt, self.engine = rt, engine
        self.loop = EngineLoop(engine)
        self.limits, self.prompts = engine.limits, engine.prompts
        self.codec, self.max_model_len, self.eos = engine.codec, engine.max_model_len, engine.eos
        self.folder = rt.folder
        self.admin = AdapterAdmin(rt)
        self._lock: asyncio.Lock | None = None

    async def start(self) -> None:
        if self.engine.runner.graphs is not None:  # captures before traffic, not during it
            per_family = {e.family: name for name, e in self.rt.manager.entries.items()}
            await asyncio.to_thread(self.engine.warmup, (None, *per_family.values()))
        self.loop.start()

    def close(self) -> None:
        self.loop.stop()

    @property
    def healthy(self) -> bool:
        return self.loop.alive

    @property
    def stats(self) -> Stats:
        return Stats.of(self.engine)

    @property
    def adapters(self) -> list[AdapterCard]:
        return self.admin.cards()

    @property
    def waiting(self) -> int:
        return self.engine.num_waiting

    def adapter_names(self) -> set[str]:
        return set(self.rt.manager.entries)

    async def submit(self, prompt_ids, adapter, params, request_id):
        """As CoreClient.submit: KeyError / ValueError as Engine.add_request raises them."""
        return self.loop.submit(prompt_ids, adapter, params, request_id,
                                asyncio_loop=asyncio.get_running_loop())

    def abort(self, request_id: str) -> bool:
        return self.loop.abort(request_id)

    async def adapter_op(self, op: str, name: str, path: str | None = None) -> None:
        """As CoreClient.adapter_op (reading and converting off the event loop)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                if op == "load":
                    await asyncio.to_thread(self.admin.load, name, path)
                else:
                    self.admin.unload(name)
            except KeyError as e:
                raise AdapterError(404, str(e.args[0] if e.args else e)) from None
            except (ValueError, OSError) as e:
                raise AdapterError(400, str(e)) from None
