"""The GPU decode step, variant against variant in one process: the decoder's
elementwise ops as torch ops or as the fused Triton kernels (models.fused), and the adapter
routes (VARIANTS: the shrink on a side stream beside the base GEMM, then the Triton expand of
triton_expand.py deferred to the consumer kernels or in place, or the C++ expand op; or
uora_group_ after the base GEMM). Llama-2-7B shape, bf16, random weights, 512-token contexts,
64 distinct adapters (r=256 on q/v) or none; the step is the decode graph's replay (CUDA
events), as the engine runs it. Also: device memory after loading and after the adapter steps
(weights are never copied), prefill of 8 x 512 tokens with 8 distinct adapters against none,
and a kernel profile of the batch-64 step.

The first run of this file (bench/results/decode_gpu_routes.json) also measured the route it
replaced, the shrink inside the base GEMM over a copy of each weight with A_cat's rows
appended: as fast as the side stream (9.85 vs 9.86 ms at batch 64) for a copy of every
adapted group's weight (+3.2 GB for q/v adapters on this shape).

  python bench/bench_decode_gpu.py [--rounds 2] [--batches 1,64,256] [--name decode_gpu]
      [--variants torch,none,deferred,triton,cpp,group] [--no-prefill] [--profile-dir DIR]

Variants run round-robin (`--rounds` times each, the median kept), so drift hits all alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402
from bench_engine_gpu import (LLAMA2_7B, copy_bandwidth, decode_step, settle,  # noqa: E402
                              synthetic_adapter)

import uora_rt  # noqa: E402
from uora_rt import Engine, SamplingParams  # noqa: E402
from uora_rt.kernels.routes import KernelPrefs  # noqa: E402

# name -> (label, fused elementwise kernels, adapter route, adapters). Routes: "deferred" =
# parallel shrink + the Triton expand on the side stream, added by the consumer kernels (the
# default), "triton" = the Triton expand in place after the base GEMM, "cpp" = the C++ expand
# op in place, "group" = the C++ uora_group_ after the base GEMM.
VARIANTS = {"torch": ("torch ops, none", False, "deferred", False),
            "none": ("fused, none", True, "deferred", False),
            "deferred": ("fused, 64 adapters, deferred Triton expand", True, "deferred", True),
            "triton": ("fused, 64 adapters, Triton expand", True, "triton", True),
            "cpp": ("fused, 64 adapters, C++ expand", True, "cpp", True),
            "group": ("fused, 64 adapters, uora_group_", True, "group", True)}


def setup(rt, fused, route):
    rt.kernel_prefs = KernelPrefs(fused=fused, parallel_shrink=route != "group",
                                  triton_expand=route in ("deferred", "triton"),
                                  defer_expand=route == "deferred")


def prefill_ms(rt, names, n=8, length=512, reps=3) -> float:
    """One engine step that prefills n fresh prompts at once (eager), median of reps."""
    times = []
    g = torch.Generator().manual_seed(1)
    for _ in range(reps + 1):
        engine = Engine(rt, kv_cache_tokens=n * (length + 64), max_num_seqs=n)
        for i in range(n):
            engine.add_request(torch.randint(0, rt.model.spec.vocab, (length,), generator=g)
                               .tolist(), names[i % len(names)] if names else None,
                               SamplingParams(max_tokens=2, ignore_eos=True))
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
        engine.close()
    return statistics.median(times[1:])  # the first builds fused weights / compiles


def profile_step(rt, batch, names, path):
    """The top kernels of one replayed decode step (torch.profiler, 5 replays averaged)."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(rt, kv_cache_tokens=batch * 600, max_num_seqs=batch)
    g = torch.Generator().manual_seed(0)
    for i in range(batch):
        engine.add_request(torch.randint(0, rt.model.spec.vocab, (512,), generator=g).tolist(),
                           names[i % len(names)] if names else None,
                           SamplingParams(max_tokens=40, ignore_eos=True))
    settle(engine)
    graph, _ = next(reversed(engine.runner.graphs.graphs.values()))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0))
        if us:
            rows.append((us / 5, e.count / 5, e.key))
    rows.sort(reverse=True)
    with open(path, "w") as f:
        f.write(f"# decode step, batch {batch}, adapters {len(set(names or []))}: "
                f"{sum(r[0] for r in rows):.0f} us of kernels, {sum(r[1] for r in rows):.0f} "
                f"launches per step\n")
        for us, n, key in rows[:30]:
            f.write(f"{us:9.1f} us {n:6.0f} x  {key[:110]}\n")
    for rid in list(engine._live):
        engine.abort(rid)
    engine.run_until_done()
    engine.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--name", default="decode_gpu")
    ap.add_argument("--profile-dir", default=None)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="of " + ",".join(VARIANTS))
    ap.add_argument("--prefill", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args()
    records = []
    bw = copy_bandwidth()
    records.append({"kind": "ceiling", "copy_bytes_per_s": bw})
    rt = uora_rt.Runtime.random(LLAMA2_7B, device="cuda", dtype=torch.bfloat16, slots=256)
    weights = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    for i in range(64):
        rt.add_adapter(synthetic_adapter(rt, i), name=f"ad{i}")
    names64 = [f"ad{i}" for i in range(64)]
    factors = rt.manager.device_bytes()

    def mem(label):
        gc.collect()  # engines of earlier variants (their KV caches and graph pools)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return {"kind": "memory", "label": label, "allocated": torch.cuda.memory_allocated(),
                "weights_bytes": weights, "pool_bytes": factors}

    records.append(mem("loaded, 64 adapters registered"))
    variants = [VARIANTS[v] for v in args.variants.split(",")]
    for batch in [int(b) for b in args.batches.split(",")]:
        got = {v[0]: [] for v in variants}
        for _ in range(args.rounds):
            for label, fused, shrink, with_ad in variants:
                setup(rt, fused, shrink)
                d = decode_step(rt, batch, names64 if with_ad else None)
                got[label].append(d)
                print(f"  batch {batch:3} {label:50}: graph {d['graph_ms']:6.2f} ms", flush=True)
        for label, fused, shrink, with_ad in variants:
            ds = got[label]
            rec = dict(ds[0], kind="decode", label=label, fused_kernels=fused, route=shrink,
                       graph_ms=statistics.median(d["graph_ms"] for d in ds),
                       api_ms=statistics.median(d["api_ms"] for d in ds),
                       graph_ms_all=[d["graph_ms"] for d in ds], weights_bytes=weights)
            rec["floor_ms"] = (weights + rec["kv_bytes"]) / bw * 1e3
            records.append(rec)
            print(f"batch {batch:3} {label:50}: graph {rec['graph_ms']:6.2f} ms "
                  f"(floor {rec['floor_ms']:.2f}, {rec['floor_ms'] / rec['graph_ms']:.0%}), "
                  f"step() {rec['api_ms']:6.2f} ms", flush=True)
        common.write(args.name, records)
    records.append(mem("after every variant's decode steps"))
    setup(rt, True, "deferred")
    for label, names in (("none", None), ("8 distinct adapters", names64[:8])) if args.prefill \
            else ():
        ms = prefill_ms(rt, names)
        records.append({"kind": "prefill", "label": label, "tokens": 8 * 512, "ms": ms})
        print(f"prefill 8 x 512, {label}: {ms:.1f} ms", flush=True)
    common.write(args.name, records)
    if args.profile_dir:
        for fused in (False, True):
            setup(rt, fused, "deferred")
            for names in (None, names64):
                tag = f"{'fused' if fused else 'torch'}_{'64ad' if names else 'none'}"
                profile_step(rt, 64, names, Path(args.profile_dir) / f"profile_b64_{tag}.txt")
    print("done")


if __name__ == "__main__":
    main()
