"""Shared benchmark plumbing: timing, environment record, JSON output."""

from __future__ import annotations

import gzip
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


# A record's fields larger than this as JSON (per-request or per-token rows) go to
# NAME.rows.json.gz beside the JSON, which keeps only summaries and stays readable in a diff.
ROW_BYTES = 2048


def write(name: str, records: list[dict], env: dict | None = None) -> Path:
    """bench/results/NAME.json: the environment and the records' summaries; raw rows (fields
    over ROW_BYTES) in NAME.rows.json.gz, which read() puts back."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    rows_path = RESULTS / f"{name}.rows.json.gz"
    summaries, rows = [], {}
    for i, rec in enumerate(records):
        summary = {}
        for k, v in rec.items():
            if isinstance(v, (list, dict)) and len(json.dumps(v)) > ROW_BYTES:
                rows[f"{i}.{k}"] = v
                v = {"rows": rows_path.name, "count": len(v)}
            summary[k] = v
        summaries.append(summary)
    path.write_text(json.dumps({"env": {**environment(), **(env or {})}, "records": summaries},
                               indent=1) + "\n")
    if rows:
        # mtime 0: the same rows give the same bytes (no churn in git)
        with gzip.GzipFile(rows_path, "wb", mtime=0) as f:
            f.write(json.dumps(rows, separators=(",", ":")).encode())
    elif rows_path.exists():
        rows_path.unlink()
    print(f"wrote {path}" + (f" (+ {rows_path.name})" if rows else ""))
    return path


def read(path) -> dict:
    """A results JSON as write() was given it: {"env", "records"} with the raw rows back."""
    path = Path(path)
    data = json.loads(path.read_text())
    placed = [(i, k) for i, r in enumerate(data["records"]) for k, v in r.items()
              if isinstance(v, dict) and set(v) == {"rows", "count"}]
    if placed:
        with gzip.open(path.parent / data["records"][placed[0][0]][placed[0][1]]["rows"]) as f:
            rows = json.loads(f.read())
        for i, k in placed:
            data["records"][i][k] = rows[f"{i}.{k}"]
    return data


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
