"""`uora-rt serve`: an OpenAI-compatible HTTP server over the engine, where `model` names the
adapter (vLLM's endpoint names, error shapes and usage fields, so existing clients work).

One job per file: protocol (request/response models, refused fields), errors (OpenAI-style
error bodies), adapters (names, the adapter folder's path rules, reading .uora / PEFT VeRA),
metrics (Prometheus), state (what routes share: engine loop, admission, adapter loading),
completions (requests -> engine -> JSON or SSE), app (the routes), args (the command).

    app, state = build(args)           # or: build_app(ServerState(rt, engine, ServerConfig(...)))
"""

__all__ = ["ServerConfig", "ServerState", "build_app"]


def __getattr__(name):  # lazy: `uora-rt inspect` must not pay for importing FastAPI
    if name == "build_app":
        from uora_rt.server.app import build_app

        return build_app
    if name in ("ServerConfig", "ServerState"):
        from uora_rt.server import state

        return getattr(state, name)
    raise AttributeError(name)
