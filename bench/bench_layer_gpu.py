"""One adapted linear with 64 distinct adapters (bf16) on the GPU.

Methods (each y = x W^T + the adapters' delta):
  base       the base GEMM alone
  parallel   shrink GEMM from the shared A_cat on a side stream beside the base GEMM, then the
             Triton expand (C++ uora_expand_ above 512 rows)\
                     (the runtime's path)
  fused      base GEMM over a copy [W; A_cat] (shrink inside it) + uora_expand_\
  (the path it replaced)
  group      base GEMM + uora_group_ (own shrink GEMM + expand)
  torch_comp docs/design.md §4 as plain torch ops (gather, mix, two GEMMs, scale-add)
  peft_loop  per adapter: gather its rows, two small GEMMs, scale, scatter-add (PEFT mixed batch)
Cold: CUDA events, warm-up, L2 flushed before every repetition, median. Graph (T <= 256): eight
layers with their own weights (shared A_cat/B_cat/tables, as in a model) captured in one CUDA graph,
median per layer. Ratios are to base in the same mode; TB/s and TFLOP/s use the minimum bytes and
FLOPs of each method (gpu_bench.Layer.cost) against ceilings measured in the same run.

python bench/bench_layer_gpu.py [--quick | --ranks 64,256 --tokens 1,16,64,256]
    -> bench/results/layer_gpu.{json,png}
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "kernels"))
import common
import gpu_bench as gb

SHAPES = [(4096, 4096), (4096, 11008)]  # (out, in)
RANKS = [64, 256, 1024]
TOKENS = [1, 16, 64, 256, 4096, 16384]
OURS = ["parallel", "fused", "group", "torch_comp"]


def measure(out, inp, r, T, with_q, graph: bool):
    L = gb.Layer(out, inp, r, T, with_q)
    L.prepare_torch()
    methods = ["base", *OURS] + (["peft_loop"] if with_q else [])
    if "peft_loop" in methods:
        L.prepare_loop()
    recs = []
    reps = 15 if T <= 4096 else 7
    res = {m: gb.time_cold(getattr(L, m), reps=reps) for m in methods}
    if graph:
        layers = [L]
        for _ in range(7):
            e = copy.copy(L)
            e.w = torch.randn_like(L.w)
            e.w_ext = torch.cat([e.w, L.a_cat]).contiguous()
            e.y = torch.empty_like(L.y)
            layers.append(e)
        gres = {m: gb.time_graph([getattr(e, m) for e in layers])
                for m in methods if m != "peft_loop"}
    for m in methods:
        b, f = L.cost(m)
        rec = {"out": out, "in": inp, "r": r, "T": T, "with_q": with_q, "method": m,
               "us": res[m], "ratio": res[m] / res["base"], "TBps": b / res[m] / 1e6,
               "TFLOPs": f / res[m] / 1e6}
        if graph and m in gres:
            rec["graph_us"] = gres[m]
            rec["graph_ratio"] = gres[m] / gres["base"]
        recs.append(rec)
    return recs


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(SHAPES), len(RANKS), figsize=(15, 8), sharex=True)
    for i, (out, inp) in enumerate(SHAPES):
        for j, r in enumerate(RANKS):
            ax = axes[i][j]
            for m, style in [("parallel", "C0-o"), ("fused", "C4-d"), ("group", "C1-s"),
                             ("torch_comp", "C2-^"), ("peft_loop", "C3-x")]:
                pts = [(x["T"], x["ratio"]) for x in records if x["out"] == out and
                       x["in"] == inp and x["r"] == r and x["method"] == m and x["with_q"]]
                if pts:
                    ax.plot(*zip(*pts), style, label=m + " (cold)")
            pts = [(x["T"], x["graph_ratio"]) for x in records if x["out"] == out and
                   x["in"] == inp and x["r"] == r and x["method"] == "parallel" and x["with_q"]
                   and "graph_ratio" in x]
            if pts:
                ax.plot(*zip(*pts), "C0--", label="parallel (graph, 8 layers)")
            ax.axhline(1.03, color="k", lw=0.5, ls=":")
            ax.axhline(1.15, color="k", lw=0.5, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{out}x{inp}, r={r}, with Q", fontsize=9)
            if i == len(SHAPES) - 1:
                ax.set_xlabel("tokens T")
            if j == 0:
                ax.set_ylabel("time / base GEMM")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("One adapted linear, 64 distinct adapters, bf16, H200 (lines: +3%, +15%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ranks", default=None, help="comma-separated (default: 64,256,1024)")
    ap.add_argument("--tokens", default=None, help="comma-separated (default: 1 ... 16384)")
    ap.add_argument("--out", default=str(common.RESULTS))
    args = ap.parse_args()
    shapes, ranks, tokens = ((SHAPES[:1], [256], [1, 4096]) if args.quick
                             else (SHAPES, RANKS, TOKENS))
    if args.ranks:
        ranks = [int(v) for v in args.ranks.split(",")]
    if args.tokens:
        tokens = [int(v) for v in args.tokens.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    ceil = gb.ceilings()
    print(f"ceilings: copy {ceil['copy_TBps']:.2f} TB/s, "
          f"bf16 mm {ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    env = common.environment()
    env["git"] = os.environ.get("UORA_GIT_SHA", env["git"])
    env["device"] = torch.cuda.get_device_name()
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)

    def save(records):
        (outdir / "layer_gpu.json").write_text(json.dumps(
            {"env": env, "ceilings": ceil, "shapes_out_in": shapes, "ranks": ranks,
             "tokens": tokens, "adapters": 64, "records": records}, indent=1) + "\n")

    records = []
    for out, inp in shapes:
        for r in ranks:
            for T in tokens:
                for with_q in (True, False):
                    recs = measure(out, inp, r, T, with_q, graph=T <= 256)
                    records += recs
                    for x in recs:
                        g = (f" graph {x['graph_us']:8.1f} ({x['graph_ratio']:.3f})"
                             if "graph_us" in x else "")
                        print(f"{out}x{inp} r={r:4d} T={T:5d} q={int(with_q)} {x['method']:9s} "
                              f"{x['us']:9.1f} us  x{x['ratio']:6.3f}  {x['TBps']:5.2f} TB/s "
                              f"{x['TFLOPs']:6.1f} TFLOP/s{g}", flush=True)
                    torch.cuda.empty_cache()
                    save(records)  # after every case: a run cut short still leaves its numbers
    plot(records, outdir / "layer_gpu.png")
    print(f"wrote {outdir / 'layer_gpu.json'} and layer_gpu.png")


if __name__ == "__main__":
    main()
