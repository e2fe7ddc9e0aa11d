"""What every route shares: the handle on the engine, the served names, the admission rule (a
bounded queue), adapter loading and unloading, and the metrics."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from uora_rt.engine.client import CoreGone
from uora_rt.engine.messages import AdapterError
from uora_rt.server.adapters import AdapterDir, check_name
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
    """engine: the server's handle on the engine: an engine core in its own process
    (engine.client.CoreClient, what `uora-rt serve` runs) or in this one (local.LocalEngine).
    Routes ask it, and never the runtime, what a request may be."""

    def __init__(self, engine, config: ServerConfig):
        if not config.served_names:
            raise ValueError("served_names: give at least one name for the base model")
        if config.max_queued < 1:
            raise ValueError(f"max_queued: expected >= 1, got {config.max_queued}")
        if config.allow_adapter_loading and not config.adapter_dir:
            raise ValueError("--allow-adapter-loading needs --adapter-dir (the only folder "
                             "adapters may be loaded from)")
        self.engine, self.config = engine, config
        self.base_name = config.served_names[0]
        self.metrics = Metrics(engine, base_name=self.base_name)
        self.adapter_dir = AdapterDir(config.adapter_dir) if config.adapter_dir else None
        self.created = int(time.time())
        self.defaults: dict = {}
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
    async def start(self) -> None:
        await self.engine.start()
        clash = sorted(set(self.config.served_names) & self.engine.adapter_names())
        if clash:
            raise ValueError(f"adapter names {clash} are also served names of the base model")
        self.defaults = generation_defaults(self.engine.folder)

    def stop(self) -> None:
        self.engine.close()

    @property
    def healthy(self) -> bool:
        return self.engine.healthy

    # --- requests ---------------------------------------------------------------------------
    def adapter_for(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (None: the base); 404 if it names nothing."""
        if model is None or model in self.config.served_names:
            return None
        if model in self.engine.adapter_names():
            return model
        self.metrics.rejected.labels("unknown_model").inc()  # one label for every unknown name
        raise APIError(404, f"The model `{model}` does not exist.", "model")

    def model_name(self, adapter: str | None) -> str:
        return self.base_name if adapter is None else adapter

    def admit(self, n: int) -> None:
        """Call right before submitting n requests, with no await in between."""
        if not self.engine.healthy:
            raise APIError(503, "the engine is not running")
        if n > self.config.max_queued:  # would never be admitted: not a retryable 503
            raise APIError(400, f"{n} sequences (prompts x n) in one request exceed the queue "
                                f"limit ({self.config.max_queued})", "prompt")
        waiting = self.engine.waiting
        if waiting + n > self.config.max_queued:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(503, f"the server is at capacity ({waiting} requests waiting, limit "
                                f"{self.config.max_queued}); retry later",
                           headers={"Retry-After": str(self.config.retry_after_s)})

    def adapter_cards(self) -> list[tuple[str, str | None, int]]:
        """(name, source, created) of every loaded adapter, as the engine knows them."""
        return [(c.name, c.source, c.created) for c in self.engine.adapters]

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
            path = self.adapter_dir.resolve(lora_path)
            try:  # reading, validation and (for PEFT folders) conversion: in the engine, where
                # a failed load registers nothing
                await self.engine.adapter_op("load", name, str(path))
            except AdapterError as e:
                if e.status == 409:  # the name is taken (vLLM answers 400)
                    raise APIError(400, str(e), "lora_name") from None
                raise APIError(e.status, f"cannot load adapter '{name}': {e}",
                               "lora_path") from None
            except CoreGone as e:
                raise APIError(503, str(e)) from None
        log.info("loaded adapter %r from %s", name, path)

    async def unload_adapter(self, name: str) -> None:
        self._check_loading()
        async with self._lock():
            try:
                await self.engine.adapter_op("unload", name)
            except AdapterError as e:
                if e.status == 404:
                    raise APIError(404, str(e), "lora_name") from None
                raise APIError(e.status, f"cannot unload adapter '{name}': {e}",
                               "lora_name") from None
            except CoreGone as e:
                raise APIError(503, str(e)) from None
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
