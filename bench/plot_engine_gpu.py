"""Draws bench/results/engine_gpu.png and prints the README's GPU tables from the H200 results
of bench_engine_gpu.py (engine_gpu.json: decode steps; engine_gpu_traces*.json: the offline
traces; engine_gpu_peers*.json: transformers and the old static generate on one trace).

  python bench/plot_engine_gpu.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def records(pattern: str) -> list[dict]:
    out = []
    for path in sorted(common.RESULTS.glob(pattern)):
        out += common.read(path)["records"]
    return out


def decode_table(rows) -> str:
    lines = ["| model | batch | graph replay | engine.step() | step / graph | 64 distinct adapters "
             "(graph) | sampled (graph) | byte floor |", "|" + " --- |" * 8]
    key = {(r["model"], r["batch"], r["adapters"], sampling(r)): r for r in rows}
    for (model, batch, adapters, mode), r in key.items():
        if adapters or mode != "greedy":
            continue
        ad, sa = key.get((model, batch, 64, "greedy")), key.get((model, batch, 0, "top_p"))
        rel = lambda x: "–" if x is None else \
            f"{x['graph_ms']:.2f} ms ({x['graph_ms'] / r['graph_ms']:.3f}×)"  # noqa: E731
        lines.append(
            f"| {model} | {batch} | {r['graph_ms']:.2f} ms | {r['api_ms']:.2f} ms | "
            f"{r['api_ms'] / r['graph_ms']:.2f}× | {rel(ad)} | {rel(sa)} | "
            f"{r['floor_ms']:.2f} ms |")
    return "\n".join(lines)


def sampling(r) -> str:
    """The record's sampling settings (older files: a "sampled" flag meant top-p 0.9, T 0.7)."""
    return r.get("sampling", "top_p" if r["sampled"] else "greedy")


def sampling_table(rows) -> str:
    """engine.step() of each sampling setting against greedy at the same model and batch."""
    lines = ["| model | batch | sampling | graph replay | engine.step() | step / greedy step | "
             "rows re-drawn per step |", "|" + " --- |" * 7]
    greedy = {(r["model"], r["batch"]): r for r in rows
              if not r["adapters"] and sampling(r) == "greedy"}
    for r in rows:
        g = greedy.get((r["model"], r["batch"]))
        if r["adapters"] or g is None:
            continue
        redo = r.get("fallback_rows_per_step")
        lines.append(f"| {r['model']} | {r['batch']} | {sampling(r)} | {r['graph_ms']:.2f} ms | "
                     f"{r['api_ms']:.2f} ms | {r['api_ms'] / g['api_ms']:.2f}× | "
                     f"{'' if redo is None else f'{redo:.1f}'} |")
    return "\n".join(lines)


def trace_table(rows) -> str:
    lines = ["| trace | output tok/s | vs no adapters | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) "
             "| KV / real tokens |", "|" + " --- |" * 6]
    base = {}
    for r in rows:
        model = r.get("model", "")
        base.setdefault((model, r.get("rate_per_s") is not None, r.get("requests")),
                        r["output_tokens_per_s"])
        ref = base[(model, r.get("rate_per_s") is not None, r.get("requests"))]
        t, p = r["ttft_s"], r["tpot_s"]
        kv = r.get("kv_blocks_per_real_token")
        lines.append(
            f"| {r['setup']} | {r['output_tokens_per_s']:,.0f} | "
            f"{r['output_tokens_per_s'] / ref:.3f}× | {t['p50']:.2f} / {t['p99']:.2f} | "
            f"{1e3 * p['p50']:.0f} / {1e3 * p['p99']:.0f} | {'' if kv is None else f'{kv:.3f}'} |")
    return "\n".join(lines)


def peer_table(files) -> str:
    """One row per peer run, against our engine's run on the same trace in the same call."""
    lines = ["| trace | ours (same call) | peer | ours / peer |", "|" + " --- |" * 4]
    for rows in files:
        ours = next(r for r in rows if r["engine"] == "uora_rt")
        for r in rows:
            if r is not ours:
                lines.append(f"| {r['requests']} requests, no adapters | "
                             f"{ours['output_tokens_per_s']:,.0f} tok/s | {r['setup']}: "
                             f"{r['output_tokens_per_s']:,.0f} tok/s | "
                             f"{ours['output_tokens_per_s'] / r['output_tokens_per_s']:.1f}× |")
    return "\n".join(lines)


def plot(decode, traces, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 5))
    for model, marker in (("llama2-7b", "o"), ("llama3.1-8b", "s")):
        base = [r for r in decode if r["model"] == model and not r["adapters"]
                and sampling(r) == "greedy"]
        if not base:
            continue
        xs = [r["batch"] for r in base]
        a.plot(xs, [r["graph_ms"] for r in base], marker + "-", label=f"{model} graph replay")
        a.plot(xs, [r["api_ms"] for r in base], marker + "--", label=f"{model} engine.step()")
        ads = [r for r in decode if r["model"] == model and r["adapters"]]
        a.plot([r["batch"] for r in ads], [r["graph_ms"] for r in ads], marker + ":",
               label=f"{model} 64 distinct adapters")
        a.plot(xs, [r["floor_ms"] for r in base], marker, color="gray", alpha=0.5,
               label=f"{model} byte floor")
    a.set_xscale("log", base=2)
    a.set_xlabel("decode batch (context 512)")
    a.set_ylabel("ms per step")
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    labels = [r["setup"] for r in traces]
    b.barh(labels, [r["output_tokens_per_s"] for r in traces],
           color=["tab:blue" if r["engine"] == "uora_rt" else "tab:gray" for r in traces])
    b.invert_yaxis()
    b.tick_params(axis="y", labelsize=7)
    b.set_xlabel("output tokens/s (offline traces, H200, bf16)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    decode = [r for r in records("engine_gpu.json") if r["kind"] == "decode"]
    traces = [r for r in records("engine_gpu_traces*.json") if r["kind"] == "trace"]
    files = [[r for r in common.read(p)["records"] if r["kind"] == "peer_trace"]
             for p in sorted(common.RESULTS.glob("engine_gpu_peers*.json"))]
    peers = [r for rows in files for r in rows]
    print(decode_table(decode), end="\n\n")
    print(sampling_table(decode), end="\n\n")
    print(trace_table(traces), end="\n\n")
    print(peer_table(files))
    plot(decode, traces + peers, common.RESULTS / "engine_gpu.png")


if __name__ == "__main__":
    main()
