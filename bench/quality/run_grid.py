"""The quality study's driver: pilot -> confirm -> main grid -> rank sweep -> reinit ablation -> E2E
-> plots,
each run in its own process, `--jobs` at a time, one JSON file per run (a run whose file exists
is skipped, so the study resumes where it stopped).

    python bench/quality/run_grid.py --device cuda --jobs 12 --budget gpu          # everything
    python bench/quality/run_grid.py --stages pilot --device cpu --jobs 1 --budget tiny
    python bench/quality/run_grid.py --stages main --dry-run                      # list the runs

Stages: pilot (learning rates on a validation split carved from train, seed 0), confirm (where
the budget's pilot is shorter than the main runs: the pilot's two best settings per task and
method again on the same split at the main budget; the better one is used), main (SST-2, CoLA,
MRPC, STS-B x UORA, VeRA, LoRA, full FT, head only x 3 seeds at the pilot's learning rates), rank
(SST-2 and CoLA: LoRA r 1, 8; VeRA r 32..1024; UORA r 32..384), ablation (UORA with reinit off,
every main task and seed), e2e (SmolLM2: its own pilot, then UORA, VeRA, LoRA x 3 seeds and the
untrained base on the official test set), plots (aggregate JSON, figures, the docs table).
Results: bench/results/quality/<budget>/<stage>/<task>/<run>.json; a failed run leaves <run>.log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import budgets as B  # noqa: E402
import glue  # noqa: E402

STAGES = ("pilot", "confirm", "main", "rank", "ablation", "e2e", "plots")
RESULTS = glue.REPO / "bench" / "results" / "quality"


def run_name(s: dict) -> str:
    return f"{s['method']}-r{s['r']}-lr{s['lr']:g}-hlr{s['head_lr']:g}-s{s['seed']}"


def run_path(root: Path, s: dict) -> Path:
    return root / s["stage"] / s["task"] / f"{run_name(s)}.json"


def spec(stage, task, method, r, seed, lr, head_lr, args):
    return {"stage": stage, "task": task, "method": method, "r": r, "seed": seed, "lr": lr,
            "head_lr": head_lr, "budget": args.budget, "device": args.device}


def tasks(args):
    return B.MAIN_TASKS + (("rte",) if args.rte else ())


def pilot_runs(args):
    out = []
    for task in tasks(args):
        for method in ("uora", "vera", "lora", "full", "head"):
            for lr in B.PILOT_LR[method]:
                for hlr in B.head_lrs(method):
                    out.append(spec("pilot", task, method, B.MAIN_R[method], 0, lr, hlr, args))
    return out


def e2e_pilot_runs(args):
    return [spec("pilot", "e2e", m, B.E2E_R[m], 0, lr, 0.0, args)
            for m in B.E2E_METHODS for lr in B.E2E_PILOT_LR[m]]


def best_settings(root: Path, runs: list[dict]) -> dict:
    """(task, method) -> (lr, head_lr) with the best validation score (ties: the smaller lr)."""
    best, missing = {}, []
    for s in runs:
        p = run_path(root, s)
        if not p.is_file():
            missing.append(str(p))
            continue
        score = json.loads(p.read_text())["score"]
        key = (s["task"], s["method"])
        cand = B.preference(score, s)
        if key not in best or cand > best[key][0]:
            best[key] = (cand, (s["lr"], s["head_lr"]))
    if missing:
        raise SystemExit(f"the pilot is not complete ({len(missing)} runs missing, e.g. "
                         f"{missing[0]}): run --stages pilot first")
    return {k: v[1] for k, v in best.items()}


CONFIRM_TOP = 2


def short_pilot(args, task) -> bool:
    return "pilot" in B.BUDGETS[args.budget][task]


def confirm_runs(args, root: Path, pilot: list[dict]) -> list[dict]:
    """A short pilot can favour a learning rate that a run of the main budget does not survive
    (it then ends at the majority class): the pilot's CONFIRM_TOP best settings per task and
    method run again at the main budget, on the same validation split."""
    best_settings(root, pilot)  # the pilot must be complete
    ranked = {}
    for s in pilot:
        if short_pilot(args, s["task"]):
            score = json.loads(run_path(root, s).read_text())["score"]
            ranked.setdefault((s["task"], s["method"]), []).append(
                (B.preference(score, s), s))
    out = []
    for runs in ranked.values():
        # The best head learning rate per adapter learning rate: the question is which adapter
        # rate survives the longer run (for head-only runs, which head rate does).
        per_lr = {}
        for key, s in sorted(runs, key=lambda x: x[0], reverse=True):
            per_lr.setdefault(s["lr"] if len({x["lr"] for _, x in runs}) > 1 else s["head_lr"], s)
        out += [{**s, "stage": "confirm"} for s in list(per_lr.values())[:CONFIRM_TOP]]
    return out


def chosen_settings(args, root: Path, pilot: list[dict]) -> dict:
    """(task, method) -> (lr, head_lr) for the later stages: the confirm stage's best where the
    pilot was short, the pilot's best elsewhere."""
    lrs = best_settings(root, pilot)
    confirm = confirm_runs(args, root, pilot)
    if confirm:
        missing = [s for s in confirm if not run_path(root, s).is_file()]
        if missing:
            raise SystemExit(f"the confirm stage is not complete ({len(missing)} runs missing, "
                             f"e.g. {run_path(root, missing[0])}): run --stages confirm first")
        lrs.update(best_settings(root, confirm))
    return lrs


# (task, method) pairs that --only filtered out of the pilot have no learning rate: they are
# filtered out of the later stages too.
def main_runs(args, lrs):
    return [spec("main", t, m, B.MAIN_R[m], seed, *lrs[(t, m)], args)
            for t in tasks(args) for m in ("uora", "vera", "lora", "full", "head")
            if (t, m) in lrs for seed in B.SEEDS]


def rank_runs(args, lrs):
    return [spec("rank", t, m, r, seed, *lrs[(t, m)], args)
            for t in B.RANK_TASKS for m, ranks in B.RANK_SWEEP.items() if (t, m) in lrs
            for r in ranks if r != B.MAIN_R[m] for seed in B.SEEDS]


def ablation_runs(args, lrs):
    return [spec("ablation", t, "uora_noreinit", B.MAIN_R["uora"], seed, *lrs[(t, "uora")], args)
            for t in tasks(args) if (t, "uora") in lrs for seed in B.SEEDS]


def e2e_runs(args, lrs):
    runs = [spec("e2e", "e2e", m, B.E2E_R[m], seed, lrs[("e2e", m)][0], 0.0, args)
            for m in B.E2E_METHODS if ("e2e", m) in lrs for seed in B.SEEDS]
    return runs + [spec("e2e", "e2e", "base", 0, 0, 0.0, 0.0, args)]


def set_aside_superseded(args, root: Path) -> None:
    """Moves main, rank and ablation runs made at learning rates the pilot and confirm stages no
    longer choose (an earlier pilot's) to <root>/superseded/, so that the tables hold only the
    chosen settings and the earlier runs stay on record."""
    if not any((root / stage).is_dir() for stage in ("main", "rank", "ablation")):
        return  # (E2E only so far)
    try:
        lrs = chosen_settings(args, root, pilot_runs(args))
    except SystemExit as e:
        print(f"  nothing set aside ({e}); a table cell may then mix learning rates")
        return
    planned = {run_path(root, s) for s in
               main_runs(args, lrs) + rank_runs(args, lrs) + ablation_runs(args, lrs)}
    for stage in ("main", "rank", "ablation"):
        for p in sorted((root / stage).glob("*/*.json")):
            if p in planned or p.parent.name not in tasks(args):  # (RTE without --rte: kept)
                continue
            dest = root / "superseded" / p.relative_to(root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            while dest.exists():  # an earlier set-aside run of the same name stays too
                dest = dest.with_name(dest.stem + "+.json")
            p.rename(dest)
            print(f"  set aside (settings no longer chosen): {p.relative_to(root)}")


class Pending(dict):
    """Learning rates before the pilot has run (--dry-run): 0 for every pair."""

    def __contains__(self, key):
        return True

    def __missing__(self, key):
        return (0.0, 0.0)


def cost(s) -> float:
    """A rough relative cost, so the longest runs start first."""
    rows = {"sst2": 20, "cola": 3, "mrpc": 3, "stsb": 3, "rte": 1, "e2e": 40}[s["task"]]
    return rows * (1.5 if s["method"] == "full" else 1.0) * (0.3 if s["method"] == "head" else 1)


def selected(s: dict, only: str, skip=()) -> bool:
    """Whether run s passes the --only filters (E2E runs pass any task filter)."""
    for part in filter(None, only.split(";")):
        key, _, values = (x.strip() for x in part.partition("="))
        if key in skip or (key == "task" and s["task"] == "e2e"):
            continue
        if key not in s:
            raise SystemExit(f"--only: unknown key {key!r}; use task, method, seed, r")
        if str(s[key]) not in [v.strip() for v in values.split(",")]:
            return False
    return True


def execute(runs, root: Path, args) -> list[str]:
    runs = [s for s in runs if selected(s, args.only)]
    todo = [s for s in runs if not run_path(root, s).is_file()]
    print(f"  {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"({args.jobs} at a time)", flush=True)
    if args.dry_run:
        for s in todo:
            print("   ", run_path(root, s).relative_to(root))
        return []
    # the longest first; within equal cost seed 0 of every method before seed 1, so that a
    # study cut short has whole comparisons
    todo.sort(key=lambda s: (-cost(s), s["seed"]))
    # threads per run: the cores shared among the jobs, unless set (several drivers at once)
    threads = os.environ.get("UORA_STUDY_THREADS") or str(max(1, (os.cpu_count() or 1) //
                                                             args.jobs))
    env = dict(os.environ, UORA_STUDY_THREADS=threads,
               UORA_STUDY_DATA=str(Path(args.data).resolve()), TOKENIZERS_PARALLELISM="false")
    failed, done = [], [0]

    def one(s):
        out = run_path(root, s)
        log = out.with_suffix(".log")
        out.parent.mkdir(parents=True, exist_ok=True)
        t = time.time()
        proc = subprocess.run([sys.executable, str(HERE / "run_chunk.py"), json.dumps(s),
                               "--out", str(out)], env=env, capture_output=True, text=True)
        done[0] += 1
        head = f"  [{done[0]}/{len(todo)}] {out.relative_to(root)}"
        if proc.returncode:
            log.write_text(proc.stdout + proc.stderr)
            failed.append(str(out))
            print(f"{head}: FAILED (exit {proc.returncode}, see {log})", flush=True)
        else:
            log.unlink(missing_ok=True)
            print(f"{head}: {proc.stdout.strip().split(': ', 1)[-1]} [{time.time() - t:.0f} s]",
                  flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(one, todo))
    return failed


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated, in this order: {','.join(STAGES)}")
    ap.add_argument("--device", default="cpu", help="cuda or cpu")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (processes)")
    ap.add_argument("--budget", default="gpu", choices=sorted(B.BUDGETS))
    ap.add_argument("--data", default=str(glue.DEFAULT_DATA),
                    help="the data folder (default ../shared/data beside the repository)")
    ap.add_argument("--rte", action="store_true", help="add RTE to the GLUE tasks")
    ap.add_argument("--no-e2e", action="store_true",
                    help="GLUE only: skip the E2E pilot and runs (they need SmolLM2's weights)")
    ap.add_argument("--results", default=str(RESULTS),
                    help="where the per-run files go (default bench/results/quality)")
    ap.add_argument("--dry-run", action="store_true", help="list the runs still to do")
    ap.add_argument("--only", default="", help="filters for a partial run, e.g. "
                    "'task=sst2,stsb;seed=0,1;method=uora,vera' (the pilot then covers only "
                    "what the later stages need)")
    args = ap.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        ap.error(f"unknown stage(s) {bad}; known: {STAGES}")
    if not (Path(args.data) / "glue").is_dir():
        ap.error(f"--data {args.data}: no glue/ folder there")
    root = Path(args.results) / args.budget
    failed = []
    for stage in STAGES:
        if stage not in stages:
            continue
        print(f"stage {stage} (budget {args.budget}, device {args.device})", flush=True)
        if stage == "pilot":
            e2e = [] if args.no_e2e else e2e_pilot_runs(args)
            failed += execute(pilot_runs(args) + e2e, root, args)
        elif stage == "plots":
            import report

            if not args.dry_run:
                set_aside_superseded(args, root)

            if not args.dry_run:
                report.main(root, args.budget)
        elif stage == "e2e" and args.no_e2e:
            continue
        else:
            pilot = [s for s in (e2e_pilot_runs(args) if stage == "e2e" else pilot_runs(args))
                     if selected(s, args.only, skip=("seed", "r"))]
            try:
                if stage == "confirm":
                    failed += execute(confirm_runs(args, root, pilot), root, args)
                    continue
                lrs = (best_settings(root, pilot) if stage == "e2e"
                       else chosen_settings(args, root, pilot))
            except SystemExit as e:
                if not args.dry_run:
                    raise
                if stage == "confirm":
                    print(f"  ({e})")
                    continue
                print("  (the pilot or confirm stage is not done: learning rates show as 0)")
                lrs = Pending()
            make = {"main": main_runs, "rank": rank_runs, "ablation": ablation_runs,
                    "e2e": e2e_runs}[stage]
            failed += execute(make(args, lrs), root, args)
    if failed:
        print(f"{len(failed)} run(s) failed; their logs lie beside them. Re-running the same "
              f"command retries only those.", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
