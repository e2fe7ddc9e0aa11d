"""`uora-rt serve`: its arguments, and the processes they start.

The server runs as two kinds of process: the engine core (commands/engine_core.py: the model,
adapters, KV cache, scheduler and sampler) and one or more HTTP front ends (server/: the OpenAI
routes, tokenization, detokenization, streams, metrics), which talk to it over a local ZeroMQ
socket. This process checks the arguments, starts the core and waits until it is ready, then
serves HTTP itself (--api-server-count 1) or through that many worker processes on one port.
If the core dies, every request in flight ends with an error, /health answers 503, and the
server exits with code 1; SIGTERM lets requests in flight finish (or aborts them after 5 s) and
stops the core.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", nargs="?", default=None,
                   help="a Hugging Face decoder folder, or 'smollm2' (default: the packaged "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve an adapter (.uora file or PEFT VeRA folder) as model NAME; "
                        "repeatable; PATH alone names it after the file")
    p.add_argument("--adapter-dir", metavar="DIR",
                   help="the only folder /v1/load_lora_adapter may read from")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("UORA_RT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: "
                        "$UORA_RT_API_KEY)")
    p.add_argument("--served-model-name", nargs="+", metavar="NAME",
                   help="names of the base for `model` (the first is reported; default: the "
                        "base folder's name)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if any)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--slots", type=int, default=64,
                   help="device slots per projection family (distinct adapters running at once)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split the decoder across N processes (one GPU each on CUDA, nccl; gloo "
                        "on the CPU): heads and MLP width sharded, embedding and head "
                        "replicated; N must divide the heads, KV heads and MLP width")
    p.add_argument("--kv-cache-tokens", type=int, help="KV cache size (default: from memory)")
    p.add_argument("--max-num-seqs", type=int, help="requests running at once")
    p.add_argument("--max-step-tokens", type=int, help="tokens per engine step (chunked prefill)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="keep computed KV blocks and reuse them for later prompts that start "
                        "the same way under the same adapter (default: on; "
                        "--no-enable-prefix-caching turns it off)")
    p.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule each engine step while the one before it runs on the device, "
                        "and build that one's outputs meanwhile (default: on; "
                        "--no-async-scheduling steps one after the other)")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting to run beyond which new ones get 503 + Retry-After")
    p.add_argument("--retry-after", type=int, default=1, help="seconds, in 503 answers")
    from uora_rt.server.limits import FLAGS, Limits

    defaults = Limits()
    for name, (flag, text) in FLAGS.items():
        default = getattr(defaults, name)
        p.add_argument(flag, dest=name, type=int, default=default, metavar="N",
                       help=text + ("" if default is None else f" (default: {default})"))
    p.add_argument("--random-weights", action="store_true",
                   help="BASE is a config.json (or a folder with one): random weights, for "
                        "benchmarks (no tokenizer: token-id prompts only)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--disable-access-log", action="store_true")
    p.add_argument("--api-server-count", type=int, default=1, metavar="N",
                   help="HTTP front-end processes sharing the port and the one engine core")


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem if not Path(spec).is_dir() else Path(spec).name, spec
        if not name or not path:
            raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
        out.append((name, Path(path)))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"--adapter: names given twice: {dup}")
    return out


def served_names(args) -> list[str]:
    from uora_rt.models.bases import base_name

    if args.served_model_name:
        return args.served_model_name
    if args.random_weights:
        path = Path(args.base)
        return [(path if path.is_dir() else path.parent).name]
    return [base_name(args.base, args.base or "")]


def check(args):
    """(start-up adapters, ServerConfig) once every cheap check has passed; ValueError/OSError
    naming the argument otherwise (nothing has started yet)."""
    from uora_rt.server.adapters import AdapterDir, check_name
    from uora_rt.server.errors import APIError
    from uora_rt.server.state import ServerConfig

    adapters = parse_adapters(args.adapter)
    if args.adapter_dir and not args.allow_adapter_loading:
        raise ValueError("--adapter-dir only matters with --allow-adapter-loading")
    if args.allow_adapter_loading and not args.adapter_dir:
        raise ValueError("--allow-adapter-loading needs --adapter-dir (the only folder adapters "
                         "may be loaded from)")
    if args.adapter_dir:
        AdapterDir(args.adapter_dir)
    if args.random_weights:
        if args.base is None:
            raise ValueError("--random-weights needs BASE: a config.json or a folder with one")
        if args.tensor_parallel != 1:
            raise ValueError("--random-weights does not combine with --tensor-parallel")
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count: expected >= 1, got {args.api_server_count}")
    names = served_names(args)
    for name, path in adapters:
        try:
            check_name(name, names)
        except APIError as e:
            raise ValueError(f"--adapter {name}={path}: {e.message}") from None
        if not Path(path).exists():  # before the core starts loading the base
            raise ValueError(f"--adapter {name}={path}: no such file or folder")
    config = ServerConfig(
        served_names=names, max_queued=args.max_queued_requests, retry_after_s=args.retry_after,
        allow_adapter_loading=args.allow_adapter_loading, adapter_dir=args.adapter_dir,
        api_key=args.api_key, limits=_limits(args))
    if config.max_queued < 1:
        raise ValueError(f"--max-queued-requests: expected >= 1, got {config.max_queued}")
    return adapters, config


def _limits(args):
    from uora_rt.server.limits import FLAGS, Limits

    try:
        return Limits(**{name: getattr(args, name) for name in FLAGS})
    except ValueError as e:
        name = str(e).split(":", 1)[0]
        raise ValueError(f"{FLAGS[name][0]}: {str(e).split(': ', 1)[1]}") from None


def build_local(args):
    """`uora-rt serve`'s server with the engine in this process (no core process, one front
    end): (ASGI app, ServerState). For embedding the server and for tests."""
    from uora_rt.commands.core_process import core_options
    from uora_rt.commands.engine_core import build_engine, build_runtime
    from uora_rt.server import ServerState, build_app
    from uora_rt.server.local import LocalEngine

    adapters, config = check(args)
    opts = core_options(args, adapters)
    rt = build_runtime(opts)
    state = ServerState(LocalEngine(rt, build_engine(rt, opts)), config)
    return build_app(state), state


def run(args) -> int:
    from uora_rt.commands.core_process import CoreProcess
    from uora_rt.server.app import serve_front_ends

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        adapters, config = check(args)
    except (ValueError, OSError) as e:
        print(f"uora-rt serve: {e}", file=sys.stderr)
        return 2
    with CoreProcess(args, adapters) as core:
        code = core.wait_ready()
        if code is not None:  # it said why on stderr
            return code
        logging.getLogger("uora_rt.server").info(
            "serving %s on http://%s:%d (%d front end%s, engine core pid %d)",
            config.served_names[0], args.host, args.port, args.api_server_count,
            "s" * (args.api_server_count > 1), core.proc.pid)
        # uvicorn drains on SIGTERM, then raises it again under the handler it found: this one,
        # so that the core is stopped cleanly below and the exit code says how it ended.
        signal.signal(signal.SIGTERM, lambda *_: None)
        serve_front_ends(core.address, core.proc.pid, config, args,
                         on_stop=lambda stop: setattr(core, "on_death", stop))
        return 1 if core.died else 0
