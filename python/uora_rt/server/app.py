"""The FastAPI app: vLLM's OpenAI-compatible routes over one ServerState.

    POST /v1/completions, /v1/chat/completions   JSON, or SSE with "stream": true
    GET  /v1/models                              the base (each served name) and every adapter
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   with --allow-adapter-loading
    POST /tokenize, /detokenize                  vLLM's
    GET  /health, /metrics (Prometheus), /version

Every request passes the guard first (guard.py: request id, body size, JSON depth, Unicode,
a JSON 500 for anything unexpected).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

import uora_rt
from uora_rt.server import completions, errors, tokenize
from uora_rt.server import protocol as P
from uora_rt.server.guard import Guard
from uora_rt.server.metrics import CONTENT_TYPE

_ERRORS = {s: {"model": P.ErrorResponse} for s in (400, 401, 404, 500, 503)}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


class ApiKeyMiddleware:
    """Every /v1/* request needs `Authorization: Bearer KEY` (plain ASGI: streaming and
    disconnect detection pass through untouched)."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            got = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                resp = errors.error_response(401, "Unauthorized: send Authorization: Bearer "
                                                  "<api key>", headers={"WWW-Authenticate":
                                                                        "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def build_app(state) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        await state.start()
        try:
            yield
        finally:
            state.stop()

    app = FastAPI(title="uora_rt", version=uora_rt.__version__, lifespan=lifespan,
                  description="OpenAI-compatible serving of UORA adapters: `model` names the "
                              "adapter (or the base).")
    app.state.server = state
    errors.install(app)
    if state.config.api_key:
        app.add_middleware(ApiKeyMiddleware, key=state.config.api_key)
    app.add_middleware(Guard, limits=state.config.limits)  # added last: outermost

    @app.post("/v1/completions", response_model=P.CompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM}})
    async def create_completion(body: P.CompletionRequest, request: Request):
        return await completions.create_completion(state, body, request)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={**_ERRORS, 200: {"content": _STREAM}})
    async def create_chat_completion(body: P.ChatCompletionRequest, request: Request):
        return await completions.create_chat_completion(state, body, request)

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def show_models():
        root = state.engine.folder
        cards = [P.ModelCard(id=n, created=state.created, root=None if root is None else str(root),
                             max_model_len=state.engine.limits.max_model_len)
                 for n in state.config.served_names]
        for name, path, created in state.adapter_cards():
            cards.append(P.ModelCard(id=name, created=created, root=path,
                                     parent=state.base_name))
        return P.ModelList(data=cards)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
    async def load_lora_adapter(body: P.LoadAdapterRequest):
        await state.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added "
                                 "successfully.")

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=_ERRORS)
    async def unload_lora_adapter(body: P.UnloadAdapterRequest):
        await state.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 "successfully.")

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=_ERRORS)
    async def tokenize_route(body: P.TokenizeRequest):
        return await tokenize.tokenize(state, body)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=_ERRORS)
    async def detokenize_route(body: P.DetokenizeRequest):
        return await tokenize.detokenize(state, body)

    @app.get("/health", response_class=Response, responses={503: {"model": P.ErrorResponse}})
    async def health():
        if not state.healthy:
            return errors.error_response(503, "the engine is not running")
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> dict:
        return {"version": uora_rt.__version__}

    @app.get("/metrics", include_in_schema=False)
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return app


# --- front ends over an engine core process (what `uora-rt serve` runs) -------------------------
_FRONT_END_ENV = "UORA_RT_FRONT_END"


def front_end_app(address: str, core_pid: int, config) -> FastAPI:
    """The app of one front end: a CoreClient to the core at address, the routes over it."""
    from uora_rt.engine.client import CoreClient
    from uora_rt.server.state import ServerState

    return build_app(ServerState(CoreClient(address, core_pid), config))


def front_end_from_env() -> FastAPI:
    """uvicorn's app factory in each worker of --api-server-count N."""
    from uora_rt.server.state import ServerConfig

    opts = json.loads(os.environ[_FRONT_END_ENV])
    from uora_rt.server.limits import Limits

    config = opts["config"]
    config["limits"] = Limits(**config["limits"])
    return front_end_app(opts["address"], opts["core_pid"], ServerConfig(**config))


def serve_front_ends(address: str, core_pid: int, config, args, on_stop=None) -> None:
    """Serves HTTP until shut down: in this process, or in args.api_server_count workers that
    share the port (uvicorn restarts a worker that dies; the others keep serving).
    on_stop(stop) receives a callable that shuts the front ends down from another thread."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    common = dict(host=args.host, port=args.port, log_level=args.log_level,
                  access_log=not args.disable_access_log, timeout_graceful_shutdown=5)
    if args.api_server_count == 1:
        server = uvicorn.Server(uvicorn.Config(front_end_app(address, core_pid, config),
                                               **common))
        if on_stop is not None:
            on_stop(lambda: setattr(server, "should_exit", True))
        server.run()
        return
    os.environ[_FRONT_END_ENV] = json.dumps({"address": address, "core_pid": core_pid,
                                             "config": dataclasses.asdict(config)})
    cfg = uvicorn.Config("uora_rt.server.app:front_end_from_env", factory=True,
                         workers=args.api_server_count, **common)
    supervisor = Multiprocess(cfg, sockets=[cfg.bind_socket()])
    if on_stop is not None:
        on_stop(supervisor.should_exit.set)
    supervisor.run()
