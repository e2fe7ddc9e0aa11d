"""Measures the goal "`uora-rt train` on 50 chat pairs with defaults finishes in under 2 minutes on
the CPU for SmolLM2, and the style shows on prompts it did not see".

    python bench/train_style/measure_telegram.py [--out bench/results/train_telegram.json] \
        [-- extra train flags]

Runs `uora-rt train smollm2 --data telegram.jsonl --output ...` as a user would (a fresh process,
timed from start to exit), then answers held-out prompts greedily with and without the adapter
and counts the answers in telegram style (mostly capitals, and the word STOP).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from make_telegram import HELD_OUT  # noqa: E402


def telegram_style(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    upper = sum(c.isupper() for c in letters) / max(len(letters), 1)
    return upper > 0.8 and "STOP" in text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(HERE.parent / "results" / "train_telegram.json"))
    ap.add_argument("extra", nargs="*", help="extra flags for uora-rt train (after --)")
    args = ap.parse_args()
    data = HERE / "telegram.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "telegram.uora"
        cmd = [sys.executable, "-m", "uora_rt", "train", "smollm2", "--data", str(data),
               "--output", str(adapter), "--quiet", *args.extra]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        print(proc.stderr + proc.stdout)
        if proc.returncode:
            sys.exit(proc.returncode)
        import torch

        import uora_rt

        rt = uora_rt.load("smollm2", adapters=[("telegram", str(adapter))])
        prompts = HELD_OUT
        tuned = rt.generate(prompts, adapters=["telegram"] * len(prompts), max_new_tokens=40)
        base = rt.generate(prompts, adapters=[None] * len(prompts), max_new_tokens=40)
    rows = [{"prompt": p, "adapter": a.text.strip(), "base": b.text.strip()}
            for p, a, b in zip(prompts, tuned, base)]
    for r in rows:
        print(f"{r['prompt']}\n  adapter: {r['adapter']}\n  base:    {r['base']}")
    result = {
        "command": "uora-rt train smollm2 --data bench/train_style/telegram.jsonl --output "
                   "telegram.uora " + " ".join(args.extra),
        "wall_seconds": round(wall, 1), "threads": torch.get_num_threads(),
        "load_average_before_after": os.getloadavg(),
        "train_output": proc.stdout.strip().splitlines(),
        "held_out_in_style": sum(telegram_style(r["adapter"]) for r in rows),
        "held_out_in_style_base": sum(telegram_style(r["base"]) for r in rows),
        "held_out": len(rows), "examples": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
