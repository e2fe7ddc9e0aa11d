"""Renders bench/results/layer_gpu.json as the markdown table bench/results/layer_gpu.md.

python bench/render_layer_table.py
"""

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    d = json.loads((RESULTS / "layer_gpu.json").read_text())
    cmd = "python bench/bench_layer_gpu.py " + " ".join(sys.argv[1:])
    c = d["ceilings"]
    rows = {}
    for r in d["records"]:
        rows.setdefault((r["out"], r["in"], r["r"], int(r["with_q"]), r["T"]), {})[r["method"]] = r
    out = ["# Layer benchmark: one adapted linear, 64 distinct adapters, bf16, H200", "",
           f"Command: `{cmd.strip()}` on the GPU machine ({d['env']['torch']}); "
           f"ceilings measured in the same run: {json.dumps(c)}. Cold = CUDA events with L2 "
           "flushed, median; graph = 8 layers in one CUDA graph, per layer (T <= 256). Ratios are "
           "to the base GEMM. parallel = the runtime's GPU path (the shrink from the shared A_cat "
           "on a side stream beside the base GEMM, then the Triton expand); fused = the path it "
           "replaced (base GEMM over a copy [W; A_cat[:R]] + uora_expand_); group = base GEMM + "
           "uora_group_; torch = plain torch composition "
           "of docs/design.md §4; peft loop = per-adapter gather / two GEMMs / scatter "
           "(PEFT style). "
           "Read the graph columns for parallel: its cold time includes its host launch cost "
           "(a second stream and a Triton launch), which exceeds the GPU work at small T; the "
           "engine's decode steps replay graphs.", "",
           "| out x in | r | Q | T | base us | parallel us | parallel x | parallel x (graph) | "
           "fused x (graph) | group x | torch x | peft loop x | parallel TB/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (o, i, r, q, t), m in sorted(rows.items()):
        b, f = m.get("base"), m.get("parallel")
        if not b or not f:
            continue

        def x(name, key="ratio"):
            v = m.get(name, {}).get(key)
            return "-" if v is None else f"{v:.2f}"

        out.append(f"| {o}x{i} | {r} | {q} | {t} | {b['us']:.1f} | {f['us']:.1f} | "
                   f"{x('parallel')} | {x('parallel', 'graph_ratio')} | "
                   f"{x('fused', 'graph_ratio')} | {x('group')} | {x('torch_comp')} | "
                   f"{x('peft_loop')} | {f['TBps']:.2f} |")
    (RESULTS / "layer_gpu.md").write_text("\n".join(out) + "\n")
    print(f"wrote {RESULTS / 'layer_gpu.md'} ({len(out) - 6} rows)")


if __name__ == "__main__":
    main()
