"""Shared benchmark plumbing: timing, environment record, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except Exception:
        return "unknown"


def environment() -> dict:
    env = {"git": git_sha(), "python": platform.python_version(), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv)}
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
    return env


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds (CPU); fn must synchronize itself if it uses a GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int = 9, warmup: int = 1) -> dict:
    """Median seconds per labelled fn, timing them round-robin so that machine drift (other
    processes, frequency) hits every setup alike instead of whichever ran during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def write(name: str, records: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"env": environment(), "records": records}, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def random_adapter(rt, seed: int, r: int = 64, targets=("q_proj", "v_proj"), reinit=False):
    """A UORA adapter for rt's base with random vectors (speed does not depend on the values);
    reinit fires events so that P < 1 (the Q halves run)."""
    import uora_rt
    from uora_rt.training.trainer import TrainingHook

    torch.manual_seed(seed)
    hook = TrainingHook(rt.model, uora_rt.UORAConfig(r=r, target_modules=list(targets),
                                                     tau=0.5 if reinit else 1e-5))
    with torch.no_grad():
        for a in hook.adapters:
            a.lambda_b.normal_(0, 0.1)
            a.lambda_d.normal_(0, 0.1)
    if reinit:
        uora_rt.reinit_step(hook)
    return uora_rt.to_adapter(hook, "LlamaForCausalLM")
