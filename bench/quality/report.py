"""The study's results: aggregate JSON (bench/results/quality_<budget>_*.json), figures
(bench/results/quality_<budget>_*.png) and the markdown table docs/quality.md shows.

    python bench/quality/report.py --budget gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import glue  # noqa: E402
from budgets import SEEDS, preference  # noqa: E402

OUT = glue.REPO / "bench" / "results"
LABEL = {"uora": "UORA", "uora_noreinit": "UORA, reinit off", "vera": "VeRA (PEFT)",
         "lora": "LoRA (PEFT)", "full": "full FT", "head": "head only", "base": "base (untrained)"}
TASK_NAME = {"sst2": "SST-2 acc", "cola": "CoLA MCC", "mrpc": "MRPC acc", "stsb": "STS-B Pearson",
             "rte": "RTE acc"}


def load_runs(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/*/*.json"))]


def groups(runs, stage):
    """(task, method, r) -> list of runs (one per seed); the learning-rate stages (one seed, many
    settings) add (lr, head_lr) to the key."""
    out = {}
    for run in runs:
        s = run["spec"]
        if s["stage"] == stage:
            key = (s["task"], s["method"], s["r"])
            if stage in SETTING_STAGES:
                key += (s["lr"], s["head_lr"])
            out.setdefault(key, []).append(run)
    return out


SETTING_STAGES = ("pilot", "confirm")


def selection_table(runs) -> str:
    """The confirm stage's settings: their pilot and confirm validation scores, the chosen one
    in bold."""
    pilot = {k: v[0] for k, v in groups(runs, "pilot").items()}
    confirm = groups(runs, "confirm")
    best = {}
    for (task, method, *_), rs in confirm.items():
        pref = preference(rs[0]["score"], rs[0]["spec"])
        best[(task, method)] = max(best.get((task, method), pref), pref)
    lines = ["| task | method | lr / head lr | pilot (short) | confirm (main budget) |",
             "|---|---|---|---|---|"]
    for key in sorted(confirm, key=lambda k: (k[0], k[1], -k[3], -k[4])):
        task, method, r, lr, hlr = key
        score = confirm[key][0]["score"]
        chosen = best[(task, method)] == preference(score, confirm[key][0]["spec"])
        c = f"{100 * score:.1f}"
        p = pilot.get(key)
        p = "–" if p is None else f"{100 * p['score']:.1f}"
        lines.append(f"| {TASK_NAME[task]} | {LABEL[method]} | {lr:g} / {hlr:g} | {p} | "
                     f"{f'**{c}**' if chosen else c} |")
    return "\n".join(lines)


def mean_sd(values):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs, stage):
    rows = []
    for key, rs in sorted(groups(runs, stage).items()):
        task, method, r = key[:3]
        # GLUE metrics are fractions (shown x100); BLEU is already 0-100; the E2E pilot's score is
        # a negative loss.
        scores = [x["score"] if x["metric"] in ("neg_loss", "bleu") else 100 * x["score"]
                  for x in rs]
        m, sd = mean_sd(scores)
        timed = ([x for x in rs if x["host"]["device"] == "cuda"]
                 if rs[0]["spec"]["budget"] == "gpu" else rs)
        rows.append({
            "task": task, "method": method, "r": r, "seeds": sorted(x["spec"]["seed"] for x in rs),
            "lr": rs[0]["spec"]["lr"], "head_lr": rs[0]["spec"]["head_lr"],
            "metric": rs[0]["metric"], "mean": m, "sd": sd, "per_seed": scores,
            "metrics": {k: mean_sd([x["metrics"][k] for x in rs if k in x["metrics"]])[0]
                        for k in rs[0]["metrics"] if isinstance(rs[0]["metrics"][k], (int, float))},
            "adapter_params": rs[0]["adapter_params"], "head_params": rs[0]["head_params"],
            # time and memory from the budget's own device only (a CPU run of a gpu-budget
            # cell trains the same steps in float32; its step time and RSS compare with nothing)
            "seconds_per_step": mean_sd([x["seconds_per_step"] for x in timed
                                         if x["seconds_per_step"]])[0],
            "peak_memory_mb": mean_sd([x["peak_memory_bytes"] / 2**20 for x in timed
                                       if x["peak_memory_bytes"]])[0],
            "cpu_runs": len(rs) - len(timed),  # a gpu-budget cell's runs trained on a CPU
            "reinit_events": [x["reinit_events"] for x in rs],
            "steps": rs[0]["steps"], "devices": [x["host"]["device"] for x in rs],
            "gpus": sorted({x["host"]["cuda"] for x in rs if x["host"]["cuda"]}),
            "git": sorted({x["git"] for x in rs})})
    return rows


def fmt_cell(row):
    if row is None or row["mean"] is None:
        return "–"
    n = len(row["per_seed"])
    sd = f" ± {row['sd']:.1f}" if n > 1 else ""
    partial = f" (n={n})" if n < len(SEEDS) else ""  # a cell still missing seeds says so
    cpu = f" ({row['cpu_runs']} on CPU)" if row.get("cpu_runs") else ""
    return f"{row['mean']:.1f}{sd}{partial}{cpu}"


def glue_table(main_rows, ablation_rows, tasks) -> str:
    by = {(r["task"], r["method"], r["r"]): r for r in main_rows + ablation_rows}
    lines = ["| method | r | adapter params | head params | " + " | ".join(
        TASK_NAME[t] for t in tasks) + " | avg | s/step (SST-2) | peak MB |",
             "|" + "---|" * (len(tasks) + 7)]
    for method, r in [("lora", 8), ("vera", 256), ("uora", 256), ("uora_noreinit", 256),
                      ("full", 0), ("head", 0)]:
        cells = [by.get((t, method, r)) for t in tasks]
        if not any(cells):
            continue
        means = [c["mean"] for c in cells if c]
        avg = f"{statistics.fmean(means):.1f}" if len(means) == len(tasks) else "–"
        any_cell = next(c for c in cells if c)
        sst = by.get(("sst2", method, r))
        step = f"{sst['seconds_per_step']:.3f}" if sst and sst["seconds_per_step"] else "–"
        memory = f"{any_cell['peak_memory_mb']:.0f}" if any_cell["peak_memory_mb"] else "–"
        lines.append(f"| {LABEL[method]} | {r or '–'} | {any_cell['adapter_params']:,} | "
                     f"{any_cell['head_params']:,} | " + " | ".join(fmt_cell(c) for c in cells) +
                     f" | {avg} | {step} | {memory} |")
    return "\n".join(lines)


def plot_all(runs, budget, tasks):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    rows = summarize(runs, "main") + summarize(runs, "rank")
    written = []
    # 1. metric vs trainable adapter parameters, per task
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for method, color in (("lora", "#2171b5"), ("vera", "#6a51a3"), ("uora", "#d94801")):
            pts = sorted((r["adapter_params"], r["mean"], r["sd"]) for r in rows
                         if r["task"] == task and r["method"] == method)
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                            marker="o", color=color, label=LABEL[method], capsize=3)
        for method, style in (("full", "--"), ("head", ":")):
            ref = [r for r in rows if r["task"] == task and r["method"] == method]
            if ref:
                ax.axhline(ref[0]["mean"], ls=style, color="gray", label=LABEL[method])
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labels overlapped
        ax.set_xlabel("trainable adapter parameters (head excluded)")
        ax.set_title(TASK_NAME[task], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, f"quality_{budget}_params.png"))
    # 2. per-seed differences: UORA - VeRA (r 256) and UORA - UORA without reinit
    by_seed = {}
    for run in runs:
        s = run["spec"]
        if s["stage"] in ("main", "ablation") and s["r"] in (256,):
            by_seed[(s["task"], s["method"], s["seed"])] = 100 * run["score"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (other, color) in enumerate((("vera", "#6a51a3"), ("uora_noreinit", "#31a354"))):
        xs, ys = [], []
        for j, task in enumerate(tasks):
            for seed in range(10):
                a, b = by_seed.get((task, "uora", seed)), by_seed.get((task, other, seed))
                if a is not None and b is not None:
                    xs.append(j + (i - 0.5) * 0.25)
                    ys.append(a - b)
        ax.scatter(xs, ys, color=color, label=f"UORA − {LABEL[other]}")
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(tasks)), [TASK_NAME[t] for t in tasks], fontsize=8)
    ax.set_ylabel("difference per seed (points)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, f"quality_{budget}_seed_diffs.png"))
    # 3. learning curves with reinit events (seed 0)
    curve_tasks = [t for t in ("sst2", "cola") if t in tasks]
    fig, axes = plt.subplots(1, len(curve_tasks), figsize=(5 * len(curve_tasks), 3.6),
                             squeeze=False)
    for ax, task in zip(axes[0], curve_tasks):
        for run in runs:
            s = run["spec"]
            if (s["stage"] in ("main", "ablation") and s["task"] == task and s["seed"] == 0
                    and s["method"] in ("uora", "vera", "uora_noreinit") and run["curves"]):
                pts = run["curves"]["loss"]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1, label=LABEL[s["method"]])
                ev = run["curves"]["reinit"]
                if ev and s["method"] == "uora":
                    lo = min(p[1] for p in pts)
                    ax.plot([e[0] for e in ev], [lo] * len(ev), "|", color="#d94801", ms=8,
                            label=f"reinit events ({sum(e[1] for e in ev)})")
        ax.set_title(f"{TASK_NAME[task]}: training loss, seed 0", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, f"quality_{budget}_curves.png"))
    return written


def _save(fig, name):
    import matplotlib.pyplot as plt

    path = OUT / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def e2e_table(rows) -> str:
    lines = ["| method | r | adapter params | BLEU | ROUGE-L | seeds |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: ["lora", "vera", "uora", "base"].index(r["method"])):
        bleu = mean_sd([x for x in r["per_seed"]])
        rouge = r["metrics"].get("rouge_l")
        lines.append(f"| {LABEL[r['method']]} | {r['r'] or '–'} | {r['adapter_params']:,} | "
                     f"{bleu[0]:.1f}{f' ± {bleu[1]:.1f}' if len(r['per_seed']) > 1 else ''} | "
                     f"{rouge:.1f} | {len(r['seeds'])} |")
    return "\n".join(lines)


def main(root: Path, budget: str):
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f"no results under {root}")
    tasks = [t for t in ("sst2", "cola", "mrpc", "stsb", "rte")
             if any(r["spec"]["task"] == t and r["spec"]["stage"] == "main" for r in runs)]
    written = []
    for stage in ("pilot", "confirm", "main", "rank", "ablation", "e2e"):
        rows = summarize(runs, stage)
        if rows:
            path = OUT / f"quality_{budget}_{stage}.json"
            path.write_text(json.dumps(rows, indent=1) + "\n")
            written.append(path)
    main_rows, ab_rows = summarize(runs, "main"), summarize(runs, "ablation")
    tables = [f"<!-- generated by bench/quality/report.py --budget {budget} -->"]
    if main_rows:
        tables.append(glue_table(main_rows, ab_rows, tasks))
    rank_rows = [r for r in summarize(runs, "rank") + main_rows if r["task"] in ("sst2", "cola")
                 and r["method"] in ("lora", "vera", "uora")]
    if rank_rows:
        tables.append("| task | method | r | adapter params | score |\n|---|---|---|---|---|\n" +
                      "\n".join(f"| {TASK_NAME[r['task']]} | {LABEL[r['method']]} | {r['r']} | "
                                f"{r['adapter_params']:,} | {fmt_cell(r)} |" for r in
                                sorted(rank_rows, key=lambda r: (r["task"], r["method"], r["r"]))))
    if groups(runs, "confirm"):
        tables.append(selection_table(runs))
    e2e_rows = summarize(runs, "e2e")
    if e2e_rows:
        tables.append(e2e_table(e2e_rows))
    md = OUT / f"quality_{budget}_tables.md"
    md.write_text("\n\n".join(tables) + "\n")
    written.append(md)
    if main_rows:
        written += plot_all(runs, budget, tasks)
    for p in written:
        print(f"  wrote {p.relative_to(glue.REPO)}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="gpu")
    a = ap.parse_args()
    main(glue.REPO / "bench" / "results" / "quality" / a.budget, a.budget)
