"""The CPU's few-row GEMM (models.common.dense: (W·xᵀ)ᵀ up to SKINNY_ROWS rows) against plain
F.linear, as the engine's decode step sees it: SmolLM2-135M float32, `batch` requests decoding
with 96-token prompts, the two settings timed round-robin in one process (this machine's speed
drifts by tens of percent over minutes). Writes bench/results/cpu_gemm.json.

  python bench/bench_cpu_gemm.py [--batches 1,4,16,32,64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt import Engine, SamplingParams  # noqa: E402
from uora_rt.models import common as model_common  # noqa: E402


def decoding_engine(rt, batch: int) -> Engine:
    engine = Engine(rt, max_num_seqs=batch)
    g = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        engine.add_request(torch.randint(0, rt.model.spec.vocab, (96,), generator=g).tolist(),
                           None, SamplingParams(max_tokens=400, ignore_eos=True))
    while any(r.computed < r.prompt_len for r in engine.scheduler.running) or \
            engine.num_waiting or not engine.scheduler.running:  # every prompt prefilled
        engine.step()
    return engine


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,4,16,32,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    rt = uora_rt.load("smollm2")
    records = []
    for batch in (int(b) for b in args.batches.split(",")):
        engine = decoding_engine(rt, batch)
        times = {"dense": [], "F.linear": []}
        for _ in range(args.repeats):
            for label, rows in (("dense", model_common.SKINNY_ROWS), ("F.linear", 0)):
                saved, model_common.SKINNY_ROWS = model_common.SKINNY_ROWS, rows
                try:
                    t = time.perf_counter()
                    for _ in range(args.steps):
                        engine.step()
                    times[label].append((time.perf_counter() - t) / args.steps)
                finally:
                    model_common.SKINNY_ROWS = saved
        med = {k: statistics.median(v) for k, v in times.items()}
        records.append({"batch": batch, "dense_step_s": med["dense"],
                        "linear_step_s": med["F.linear"],
                        "speedup": med["F.linear"] / med["dense"]})
        print(f"batch {batch:3}: dense {med['dense'] * 1e3:.1f} ms, F.linear "
              f"{med['F.linear'] * 1e3:.1f} ms ({records[-1]['speedup']:.2f}x)", flush=True)
        for rid in list(engine._live):
            engine.abort(rid)
        engine.run_until_done()
    common.write("cpu_gemm", records)


if __name__ == "__main__":
    main()
