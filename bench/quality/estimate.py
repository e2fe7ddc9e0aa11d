"""Time per chunk of the study under a budget, from measured seconds per step.

    python bench/quality/estimate.py --measured tiny --budget gpu [--gpu-speedup 20]

Reads the per-run JSON of a measured budget (seconds per optimizer step per task and method, on
the machine that ran it), counts the steps each run of the target budget makes, and prints the
training time per chunk at the measured speed and, for a GPU, at that speed divided by
--gpu-speedup (a guess to replace with one measured chunk on the GPU). Evaluation, model loading
and E2E generation come on top (the measured runs' wall time minus training time says how much).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import budgets as B  # noqa: E402
import glue  # noqa: E402
import run_grid  # noqa: E402


def train_rows(task, budget, data):
    if task == "e2e":
        return len(glue.e2e(data, "main", budget)[0])
    return len(glue.load(task, data, "main", budget)[0])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--measured", default="tiny")
    ap.add_argument("--budget", default="gpu")
    ap.add_argument("--gpu-speedup", type=float, default=20.0)
    ap.add_argument("--data", default=str(glue.DEFAULT_DATA))
    args = ap.parse_args()
    root = run_grid.RESULTS / args.measured
    speed, overhead = {}, {}
    for p in root.glob("*/*/*.json"):
        r = json.loads(p.read_text())
        s = r["spec"]
        if r.get("seconds_per_step"):
            # scaled to the target budget's batch (CPU steps grow about linearly with it)
            scale = (B.BUDGETS[args.budget][s["task"]]["batch"]
                     / B.BUDGETS[args.measured][s["task"]]["batch"])
            speed.setdefault((s["task"], s["method"]), []).append(r["seconds_per_step"] * scale)
            overhead.setdefault(s["task"], []).append(r["wall_seconds"] - r["train_seconds"])
    print(f"| task | method | steps ({args.budget}) | s/step measured, scaled to the batch | "
          f"training, measured machine | at {args.gpu_speedup:g}x | load + eval (measured) |")
    print("|---|---|---|---|---|---|---|")
    for (task, method), vals in sorted(speed.items()):
        budget = B.BUDGETS[args.budget][task]
        rows = train_rows(task, budget, args.data)
        steps = (budget.get("max_steps")
                 or budget.get("epochs", 1) * math.ceil(rows / budget["batch"]))
        sps = statistics.median(vals)
        print(f"| {task} | {method} | {steps:,} | {sps:.3f} | {steps * sps / 60:.1f} min | "
              f"{steps * sps / args.gpu_speedup / 60:.1f} min | "
              f"{statistics.median(overhead[task]):.0f} s |")


if __name__ == "__main__":
    main()
