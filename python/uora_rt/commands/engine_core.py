"""The engine core process of `uora-rt serve`: `python -m uora_rt.commands.engine_core CONFIG`.

CONFIG is a JSON file the launcher (commands/serve.py) writes: the serve command's arguments and
the socket address. The process loads the base and the start-up adapters, builds the engine
(capturing its CUDA graphs first, where it has them), then serves front ends over the socket
until told to shut down, sent SIGTERM, or its launcher is gone. A start-up error is printed as
`uora-rt serve: ...` and the process exits with code 2 before it ever answers.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("uora_rt.engine")


def device_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return device, getattr(torch, dtype)


def build_runtime(opts: dict):
    """The runtime a serve configuration describes, its start-up adapters registered."""
    from uora_rt.models import checkpoint
    from uora_rt.runtime import Runtime, resolve_base
    from uora_rt.server.adapters import read_adapter

    device, dtype = device_dtype(opts["device"], opts["dtype"])
    if opts["random_weights"]:
        cfg_path = Path(opts["base"])
        folder = cfg_path if cfg_path.is_dir() else cfg_path.parent
        rt = Runtime.random(checkpoint.read_config(folder), device, dtype, slots=opts["slots"])
    else:
        rt = Runtime.from_folder(resolve_base(opts["base"]), device, dtype, slots=opts["slots"],
                                 tensor_parallel=opts["tensor_parallel"])
    try:
        for name, path in opts["adapters"]:
            try:
                rt.add_adapter(read_adapter(Path(path), rt.folder), name,
                               source=Path(path).resolve())
            except (ValueError, OSError) as e:
                raise ValueError(f"--adapter {name}={path}: {e}") from None
    except BaseException:
        rt.close()  # tensor-parallel workers must not outlive a failed start
        raise
    return rt


def build_engine(rt, opts: dict):
    import uora_rt

    engine = uora_rt.Engine(rt, kv_cache_tokens=opts["kv_cache_tokens"],
                            max_num_seqs=opts["max_num_seqs"],
                            max_step_tokens=opts["max_step_tokens"],
                            enable_prefix_caching=opts["enable_prefix_caching"], detokenize=False,
                            async_scheduling=opts.get("async_scheduling", True))
    if engine.runner.graphs is not None:  # captures before traffic, not during it
        per_family = {e.family: name for name, e in rt.manager.entries.items()}
        seconds = engine.warmup(adapters=(None, *per_family.values()))
        log.info("captured %d decode graphs in %.1f s", engine.runner.graphs.captures, seconds)
    return engine


def _watch_parent(parent: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent:  # the launcher is gone: nobody can reach us
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = json.loads(Path(argv[0]).read_text())
    logging.basicConfig(level=opts["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s (engine core): %(message)s")
    _watch_parent(opts["parent"])
    from uora_rt.engine.core import EngineCore
    from uora_rt.server.adapters import AdapterAdmin

    try:
        rt = build_runtime(opts)
    except (ValueError, OSError, KeyError) as e:
        print(f"uora-rt serve: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        engine = build_engine(rt, opts)
        core = EngineCore(engine, opts["address"], AdapterAdmin(rt), folder=rt.folder)
        signal.signal(signal.SIGTERM, lambda *_: setattr(core, "stopping", True))
        log.info("ready at %s", opts["address"])
        core.run()
        engine.close()
    except (ValueError, OSError) as e:
        print(f"uora-rt serve: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
