"""The engine in the server's own process, behind the interface the server uses for an engine
core in another process (engine/client.CoreClient): for tests that reach into the engine, and for
embedding the server in a program that already holds a runtime. `uora-rt serve` runs the split.
"""

from __future__ import annotations

import asyncio

from uora_rt.engine import EngineLoop
from uora_rt.engine.messages import AdapterError
from uora_rt.engine.messages import AdapterCard, Stats
from uora_rt.server.adapters import read_adapter


class LocalEngine:
    def __init__(self, rt, engine):
        self.rt, self.engine = rt, engine
        self.loop = EngineLoop(engine)
        self.limits, self.prompts = engine.limits, engine.prompts
        self.folder = rt.folder
        self._admin: asyncio.Lock | None = None

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
        e = self.engine
        return Stats(e.num_running, e.num_waiting, e.blocks_used, e.allocator.capacity)

    @property
    def adapters(self) -> list[AdapterCard]:
        return [AdapterCard(n, e.source, int(e.created))
                for n, e in sorted(self.rt.manager.entries.items())]

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
        if self._admin is None:
            self._admin = asyncio.Lock()
        async with self._admin:
            try:
                if op == "load":
                    if name in self.rt.manager:
                        raise AdapterError(409, f"The lora adapter '{name}' has already been "
                                                "loaded.")
                    adapter = await asyncio.to_thread(read_adapter, path, self.rt.folder)
                    await asyncio.to_thread(self.rt.add_adapter, adapter, name, path)
                else:
                    if name not in self.rt.manager:
                        raise KeyError(f"The lora adapter '{name}' cannot be found.")
                    self.rt.remove_adapter(name)  # requests holding it finish with it
            except KeyError as e:
                raise AdapterError(404, str(e.args[0] if e.args else e)) from None
            except (ValueError, OSError) as e:
                raise AdapterError(400, str(e)) from None
