"""What every route shares: the runtime, its engine and background loop, the served names, the
admission rule (a bounded queue), adapter loading and unloading, and the metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from uora_rt.engine import EngineLoop
from uora_rt.server.adapters import AdapterDir, check_name, read_adapter
from uora_rt.server.errors import APIError
from uora_rt.server.limits import Limits
from uora_rt.server.metrics import Metrics

log = logging.getLogger("uora_rt.server")


@dataclass
class ServerConfig:
    """served_names: what `model` may say for the base (the first is reported). max_queued:
    sequences accepted but not running yet beyond which new requests get 503 + Retry-After.
    limits: what one request may ask for (limits.py)."""

    served_names: list[str]
    max_queued: int = 1024
    retry_after_s: int = 1
    allow_adapter_loading: bool = False
    adapter_dir: str | None = None
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)


class ServerState:
    def __init__(self, rt, engine, config: ServerConfig):
        if not config.served_names:
            raise ValueError("served_names: give at least one name for the base model")
        if config.max_queued < 1:
            raise ValueError(f"max_queued: expected >= 1, got {config.max_queued}")
        clash = sorted(set(config.served_names) & set(rt.adapters))
        if clash:
            raise ValueError(f"adapter names {clash} are also served names of the base model")
        if config.allow_adapter_loading and not config.adapter_dir:
            raise ValueError("--allow-adapter-loading needs --adapter-dir (the only folder "
                             "adapters may be loaded from)")
        self.rt, self.engine, self.config = rt, engine, config
        self.base_name = config.served_names[0]
        self.loop = EngineLoop(engine)
        self.metrics = Metrics(engine, base_name=self.base_name)
        self.adapter_dir = AdapterDir(config.adapter_dir) if config.adapter_dir else None
        self.created = int(time.time())
        self.defaults = generation_defaults(rt.folder)
        self._admin: asyncio.Lock | None = None
        self._token_texts = None

    @property
    def token_texts(self):
        """Token id -> (text, bytes) for logprobs (server.logprobs.TokenTexts), made once."""
        if self._token_texts is None:
            from uora_rt.server.logprobs import TokenTexts

            self._token_texts = TokenTexts(self.engine.codec)
        return self._token_texts

    # --- lifetime ---------------------------------------------------------------------------
    def start(self) -> None:
        if self.engine.runner.graphs is not None:  # captures before traffic, not during it
            per_family = {e.family: name for name, e in self.rt.manager.entries.items()}
            seconds = self.engine.warmup(adapters=(None, *per_family.values()))
            log.info("captured %d decode graphs in %.1f s", self.engine.runner.graphs.captures,
                     seconds)
        self.loop.start()

    def stop(self) -> None:
        self.loop.stop()

    @property
    def healthy(self) -> bool:
        return self.loop.alive

    # --- requests ---------------------------------------------------------------------------
    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 if it names nothing."""
        if model is None or model in self.config.served_names:
            return None
        if model in self.rt.manager:
            return model
        self.metrics.rejected.labels("unknown_model").inc()  # one label for every unknown name
        raise APIError(404, f"The model `{model}` does not exist.", "model")

    def model_name(self, adapter: str | None) -> str:
        return self.base_name if adapter is None else adapter

    def admit(self, n: int) -> None:
        """Call right before submitting n requests, with no await in between."""
        if n > self.config.max_queued:  # would never be admitted: not a retryable 503
            raise APIError(400, f"{n} sequences (prompts x n) in one request exceed the queue "
                                f"limit ({self.config.max_queued})", "prompt")
        waiting = self.engine.num_waiting
        if waiting + n > self.config.max_queued:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(503, f"the server is at capacity ({waiting} requests waiting, limit "
                                f"{self.config.max_queued}); retry later",
                           headers={"Retry-After": str(self.config.retry_after_s)})

    def adapter_cards(self) -> list[tuple[str, str | None, int]]:
        """(name, source, created) of every loaded adapter, as the registry knows them."""
        entries = sorted(self.rt.manager.entries.items())
        return [(n, e.source, int(e.created)) for n, e in entries]

    # --- adapters ---------------------------------------------------------------------------
    def _check_loading(self) -> None:
        if not self.config.allow_adapter_loading:
            raise APIError(404, "runtime adapter loading is off: start the server with "
                                "--allow-adapter-loading --adapter-dir DIR")

    def _lock(self) -> asyncio.Lock:
        if self._admin is None:
            self._admin = asyncio.Lock()
        return self._admin

    async def load_adapter(self, name: str, lora_path: str) -> None:
        self._check_loading()
        if not name or not lora_path:
            raise APIError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                           "lora_name" if not name else "lora_path")
        check_name(name, self.config.served_names)
        async with self._lock():
            if name in self.rt.manager:
                raise APIError(400, f"The lora adapter '{name}' has already been loaded.",
                               "lora_name")
            path = self.adapter_dir.resolve(lora_path)
            try:  # parsing, validation and (for PEFT folders) conversion: off the event loop
                adapter = await asyncio.to_thread(read_adapter, path, self.rt.folder)
            except (ValueError, OSError) as e:
                raise APIError(400, f"cannot load adapter '{name}': {e}", "lora_path") from None
            try:
                await asyncio.to_thread(self.rt.add_adapter, adapter, name, path)
            except (ValueError, OSError) as e:
                self._forget(name)
                raise APIError(400, f"cannot load adapter '{name}': {e}", "lora_path") from None
            except BaseException:  # a failed load registers nothing
                self._forget(name)
                raise
        log.info("loaded adapter %r from %s", name, path)

    def _forget(self, name: str) -> None:
        if name in self.rt.manager:
            try:
                self.rt.remove_adapter(name)
            except Exception:
                log.exception("could not remove the half-loaded adapter %r", name)

    async def unload_adapter(self, name: str) -> None:
        self._check_loading()
        async with self._lock():
            if name not in self.rt.manager:
                raise APIError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
            try:
                self.rt.remove_adapter(name)  # requests holding it finish with it
            except (KeyError, ValueError) as e:
                raise APIError(400, f"cannot unload adapter '{name}': {e}", "lora_name") from None
        log.info("unloaded adapter %r", name)


def generation_defaults(folder) -> dict:
    """Sampling defaults: OpenAI's, overridden by the base's generation_config.json (as vLLM's
    default --generation-config auto does) for the fields the engine implements."""
    defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    base = dict(defaults)
    path = Path(folder) / "generation_config.json" if folder else None
    if path is None or not path.is_file():
        return defaults
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring %s: %s", path, e)
        return defaults
    for key, kind in (("temperature", (int, float)), ("top_p", (int, float)), ("top_k", int),
                      ("repetition_penalty", (int, float))):
        v = cfg.get(key)
        if isinstance(v, kind) and not isinstance(v, bool):
            defaults[key] = v
    other = [k for k, off in (("min_p", 0),) if cfg.get(k) is not None and cfg.get(k) != off]
    if other:
        log.warning("%s sets %s, which this server does not implement", path, other)
    if defaults != base:
        log.info("sampling defaults from %s: %s", path, defaults)
    return defaults
