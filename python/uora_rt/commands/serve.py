"""`uora-rt serve`: its arguments, and building the runtime, engine and app they describe."""

from __future__ import annotations

import argparse
import logging
import os
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


def _device_dtype(args):
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def build(args):
    """(app, state) for parsed arguments; ValueError/OSError for anything wrong in them."""
    from uora_rt.models import checkpoint
    from uora_rt.models.bases import base_name
    from uora_rt.runtime import Runtime, resolve_base

    adapters = parse_adapters(args.adapter)
    if args.adapter_dir and not args.allow_adapter_loading:
        raise ValueError("--adapter-dir only matters with --allow-adapter-loading")
    device, dtype = _device_dtype(args)
    if args.random_weights:
        if args.base is None:
            raise ValueError("--random-weights needs BASE: a config.json or a folder with one")
        if args.tensor_parallel != 1:
            raise ValueError("--random-weights does not combine with --tensor-parallel")
        cfg_path = Path(args.base)
        folder = cfg_path if cfg_path.is_dir() else cfg_path.parent
        rt = Runtime.random(checkpoint.read_config(folder), device, dtype, slots=args.slots)
        default_name = folder.name
    else:
        folder = resolve_base(args.base)
        rt = Runtime.from_folder(folder, device, dtype, slots=args.slots,
                                 tensor_parallel=args.tensor_parallel)
        default_name = base_name(args.base, folder)
    try:
        return _serve_runtime(args, rt, adapters, default_name)
    except BaseException:
        rt.close()  # tensor-parallel workers must not outlive a failed start
        raise


def _serve_runtime(args, rt, adapters, default_name):
    import uora_rt
    from uora_rt.server.adapters import check_name, read_adapter
    from uora_rt.server.app import build_app
    from uora_rt.server.errors import APIError
    from uora_rt.server.limits import FLAGS, Limits
    from uora_rt.server.state import ServerConfig, ServerState

    names = args.served_model_name or [default_name]
    for name, path in adapters:
        try:
            check_name(name, names)
        except APIError as e:
            raise ValueError(f"--adapter {name}={path}: {e.message}") from None
        try:
            rt.add_adapter(read_adapter(path, rt.folder), name, source=Path(path).resolve())
        except (ValueError, OSError) as e:
            raise ValueError(f"--adapter {name}={path}: {e}") from None
    engine = uora_rt.Engine(rt, kv_cache_tokens=args.kv_cache_tokens,
                            max_num_seqs=args.max_num_seqs, max_step_tokens=args.max_step_tokens,
                            enable_prefix_caching=args.enable_prefix_caching)
    config = ServerConfig(
        served_names=names, max_queued=args.max_queued_requests, retry_after_s=args.retry_after,
        allow_adapter_loading=args.allow_adapter_loading, adapter_dir=args.adapter_dir,
        api_key=args.api_key, limits=_limits(args, FLAGS, Limits))
    state = ServerState(rt, engine, config)
    return build_app(state), state


def _limits(args, flags, limits_cls):
    try:
        return limits_cls(**{name: getattr(args, name) for name in flags})
    except ValueError as e:
        name = str(e).split(":", 1)[0]
        raise ValueError(f"{flags[name][0]}: {str(e).split(': ', 1)[1]}") from None


def run(args) -> int:
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app, state = build(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"uora-rt serve: {e}", file=sys.stderr)
        return 2
    logging.getLogger("uora_rt.server").info(
        "serving %s (+ %d adapters) on http://%s:%d", state.base_name, len(state.rt.adapters),
        args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    access_log=not args.disable_access_log, timeout_graceful_shutdown=5)
    finally:
        state.rt.close()
    return 0
