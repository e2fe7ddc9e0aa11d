"""Prints the README's decode-step table from bench/results/NAME.json and draws
bench/results/NAME.png (graph-replayed step per variant and batch, against the byte floor).

  python bench/plot_decode_gpu.py [NAME]        (default decode_gpu)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main():
    name = sys.argv[1] if len(sys.argv) > 1 else "decode_gpu"
    recs = json.loads((RESULTS / f"{name}.json").read_text())["records"]
    dec = [r for r in recs if r["kind"] == "decode"]
    batches = sorted({r["batch"] for r in dec})
    labels = list(dict.fromkeys(r["label"] for r in dec))
    at = {(r["batch"], r["label"]): r for r in dec}
    print("| batch | " + " | ".join(labels) + " | byte floor |")
    print("| --- |" + " --- |" * (len(labels) + 1))
    for b in batches:
        none = at[(b, "fused, none")]["graph_ms"]
        cells = []
        for lab in labels:
            r = at[(b, lab)]
            rel = f" ({r['graph_ms'] / none:.3f}×)" if "adapters" in lab else \
                f" ({r['floor_ms'] / r['graph_ms']:.0%} of floor)"
            cells.append(f"{r['graph_ms']:.2f} ms{rel}")
        print(f"| {b} | " + " | ".join(cells) + f" | {at[(b, labels[0])]['floor_ms']:.2f} ms |")
    for r in recs:
        if r["kind"] in ("prefill", "memory"):
            print(r)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4))
    for ax, b in zip(axes, batches):
        ys = [at[(b, lab)]["graph_ms"] for lab in labels]
        ax.bar(range(len(labels)), ys, color=[f"C{i}" for i in range(len(labels))])
        ax.axhline(at[(b, labels[0])]["floor_ms"], color="k", ls="--", lw=1, label="byte floor")
        ax.set_xticks(range(len(labels)), [lab.replace(", ", "\n") for lab in labels],
                      fontsize=6)
        ax.set_title(f"batch {b}", fontsize=9)
        ax.set_ylabel("graph-replayed step (ms)")
        ax.legend(fontsize=7)
    fig.suptitle("Llama-2-7B-shaped decode step, bf16, H200, 512-token contexts "
                 "(bench/bench_decode_gpu.py)", fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    print(f"wrote {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
