"""Host time per engine step on the CPU, synchronous loop vs async scheduling, at batch 1/16/64.

  python bench/bench_async_cpu.py                       # ~5 min on 2 cores
  python bench/bench_async_cpu.py --rounds 5 --tokens 128

B greedy requests of 8-token prompts decode --tokens tokens each (ignore_eos) on a small random
Llama (bench_prefix_cache.SMALL: 4 layers, hidden 256, vocab 8192, float32), in one process,
round-robin over (batch, mode) so that machine load hits every mode alike. Modes: the
synchronous loop, async scheduling as it runs on the CPU by default (forward in the calling
thread), and async with the forward in a worker thread (runner.cpu_overlap = True). Per decode step:
  step_ms:  wall time per step (steady state: the prefill step and the last steps left out)
  run_ms:   the step's forward and draw, timed where they run (the calling thread when
            synchronous, the worker thread with async scheduling)
  host_ms:  step_ms - run_ms: host time on the critical path (synchronous: all of the host's
            scheduling, metadata and output work; async: what of it the forward did not hide)
  work_ms:  the calling thread's time in step() not waiting for a step (host work, hidden or not)
Writes bench/results/async_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402
from bench_prefix_cache import SMALL  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt import Engine, SamplingParams  # noqa: E402


# sync: async_scheduling=False; async: the default (on the CPU the forward runs in the calling
# thread); async+worker: the forward in a worker thread (runner.cpu_overlap)
MODES = ("sync", "async", "async+worker")


def trial(engine: Engine, batch: int, tokens: int, seed: int) -> dict:
    # without the worker the forward runs inside step() (and is not waited for): not host work
    inline = engine.async_scheduling and not engine.runner.cpu_overlap
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(torch.randint(0, SMALL["vocab_size"], (8,), generator=g).tolist(),
                           None, params)
    rows = []
    while engine.has_unfinished():
        s0 = dict(engine.stats)
        t = time.perf_counter()
        engine.step()
        wall = time.perf_counter() - t
        rows.append((wall, engine.stats["run_s"] - s0["run_s"],
                     engine.stats["forward_s"] - s0["forward_s"], engine.num_running))
    steady = rows[3:-3]  # past the prefill and the pipeline's start; before the drain
    wall = sum(r[0] for r in steady)
    run = sum(r[1] for r in steady)
    wait = sum(r[2] for r in steady)
    n = len(steady)
    return {"step_ms": 1e3 * wall / n, "run_ms": 1e3 * run / n,
            "host_ms": 1e3 * (wall - run) / n,
            "work_ms": 1e3 * (wall - wait - (run if inline else 0.0)) / n,
            "tok_s": batch * n / wall, "steps": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    rt = uora_rt.Runtime.random(SMALL)
    engines = {(b, mode): Engine(rt, max_num_seqs=b, kv_cache_tokens=b * (args.tokens + 32),
                                 async_scheduling=mode != "sync")
               for b in batches for mode in MODES}
    for (b, mode), e in engines.items():
        e.runner.cpu_overlap = mode == "async+worker"
    for (b, _), e in engines.items():  # warm-up: allocators, the worker thread, page faults
        trial(e, b, 16, 0)
    raw = {k: [] for k in engines}
    load0 = os.getloadavg()[0]
    for r in range(args.rounds):
        for key, e in engines.items():
            raw[key].append(trial(e, key[0], args.tokens, r + 1))
    records = []
    for (b, mode), trials in raw.items():
        med = {k: statistics.median(t[k] for t in trials) for k in trials[0]}
        records.append({"batch": b, "mode": mode, **med,
                        "host_share": med["host_ms"] / med["step_ms"], "trials": trials})
    for b in batches:
        s = next(x for x in records if x["batch"] == b and x["mode"] == "sync")
        for mode in MODES:
            x = next(x for x in records if x["batch"] == b and x["mode"] == mode)
            x["vs_sync"] = x["step_ms"] / s["step_ms"]
            print(f"batch {b:3d} {x['mode']:12s}: step {x['step_ms']:6.2f} ms ({x['vs_sync']:.3f}"
                  f" x sync)  run {x['run_ms']:6.2f}  host on the critical path "
                  f"{x['host_ms']:5.2f} ({100 * x['host_share']:4.1f} %)  host work "
                  f"{x['work_ms']:5.2f}  {x['tok_s']:7.0f} tok/s")
    env = {"threads": torch.get_num_threads(), "cores": os.cpu_count(),
           "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
           "model": "random Llama " + str(SMALL), "tokens": args.tokens, "rounds": args.rounds}
    print("load average (1 min) at start / end:", env["loadavg_start"], env["loadavg_end"])
    print("wrote", common.write("async_cpu", records, env))


if __name__ == "__main__":
    main()
