"""The quality study's learning-rate selection (bench/quality/run_grid.py): which settings the
confirm stage re-runs, which one the later stages use, and which runs it sets aside. Scores are
written by hand into run files, so every expected choice follows from the rules stated in
docs/quality.md, not from the code under test."""

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "quality"))
import run_grid  # noqa: E402


def args(**kw):
    return Namespace(**{"budget": "gpu", "device": "cuda", "rte": False, **kw})


def write(root, spec, score):
    p = run_grid.run_path(root, spec)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"spec": spec, "score": score}))


# pilot scores per (method, lr, head lr) on every task: UORA's two best settings are both at 0.1,
# its two best adapter rates 0.1 (0.80 with head 1e-2) and 0.03 (0.79 with head 1e-3)
PILOT = {("uora", 0.1, 1e-2): 0.80, ("uora", 0.1, 1e-3): 0.795, ("uora", 0.03, 1e-3): 0.79,
         ("uora", 0.03, 1e-2): 0.60, ("uora", 0.01, 1e-3): 0.70, ("uora", 0.01, 1e-2): 0.70,
         ("head", 0.0, 1e-3): 0.5, ("head", 0.0, 1e-2): 0.6, ("head", 0.0, 1e-1): 0.55}


def pilot(root, a):
    runs = run_grid.pilot_runs(a)
    for s in runs:  # VeRA, LoRA and full FT all tie at 0.5: the smallest rates win
        write(root, s, PILOT.get((s["method"], s["lr"], s["head_lr"]), 0.5))
    return runs


def test_confirm_reruns_the_two_best_adapter_rates_each_with_its_best_head_rate(tmp_path):
    a = args()
    runs = run_grid.confirm_runs(a, tmp_path, pilot(tmp_path, a))
    got = {(s["task"], s["method"], s["lr"], s["head_lr"]) for s in runs
           if s["method"] in ("uora", "head")}
    for task in ("sst2", "cola", "mrpc", "stsb"):  # every gpu-budget task has a short pilot
        assert {(m, lr, h) for t, m, lr, h in got if t == task} == {
            ("uora", 0.1, 1e-2), ("uora", 0.03, 1e-3),   # adapter rates 0.1 and 0.03
            ("head", 0.0, 1e-2), ("head", 0.0, 1e-1)}    # head only: its two best head rates
    assert all(s["stage"] == "confirm" and s["seed"] == 0 for s in runs)


def test_the_confirm_stage_decides_and_must_be_complete(tmp_path):
    a = args()
    runs = pilot(tmp_path, a)
    with pytest.raises(SystemExit, match="confirm stage is not complete"):
        run_grid.chosen_settings(a, tmp_path, runs)
    for s in run_grid.confirm_runs(a, tmp_path, runs):
        # at the main budget the pilot's winner (0.1) collapses, 0.03 survives
        write(tmp_path, s, {0.1: 0.50, 0.03: 0.81}.get(s["lr"], 0.6 if s["head_lr"] == 0.1
                                                          else 0.62))
    lrs = run_grid.chosen_settings(a, tmp_path, runs)
    assert lrs[("sst2", "uora")] == (0.03, 1e-3)
    assert lrs[("cola", "head")] == (0.0, 1e-2)


def test_runs_at_settings_no_longer_chosen_are_set_aside(tmp_path):
    a = args()
    runs = pilot(tmp_path, a)
    for s in run_grid.confirm_runs(a, tmp_path, runs):
        write(tmp_path, s, 0.9 if s["lr"] == 0.03 or s["head_lr"] == 1e-2 else 0.1)
    old = dict(run_grid.spec("main", "sst2", "uora", 256, 0, 0.1, 1e-2, a))
    new = dict(run_grid.spec("main", "sst2", "uora", 256, 0, 0.03, 1e-3, a))
    rte = dict(run_grid.spec("main", "rte", "uora", 256, 0, 0.1, 1e-2, a))  # without --rte
    for s in (old, new, rte):
        write(tmp_path, s, 0.8)
    run_grid.set_aside_superseded(a, tmp_path)
    assert run_grid.run_path(tmp_path, new).is_file()
    assert run_grid.run_path(tmp_path, rte).is_file()  # not this invocation's task: kept
    assert not run_grid.run_path(tmp_path, old).is_file()
    aside = tmp_path / "superseded" / run_grid.run_path(tmp_path, old).relative_to(tmp_path)
    assert aside.is_file()
    write(tmp_path, old, 0.7)  # the same run made again and set aside again: both stay
    run_grid.set_aside_superseded(a, tmp_path)
    assert aside.is_file() and aside.with_name(aside.stem + "+.json").is_file()


def run_file(seed, score, device, seconds_per_step):
    spec = run_grid.spec("main", "cola", "lora", 8, seed, 1e-3, 1e-3, args())
    return {"spec": dict(spec), "score": score, "metric": "mcc", "metrics": {"mcc": score},
            "adapter_params": 10, "head_params": 2, "seconds_per_step": seconds_per_step,
            "peak_memory_bytes": 2**20, "reinit_events": 0, "steps": 5, "git": "x",
            "host": {"device": device, "cuda": "GPU" if device == "cuda" else None}}


def test_a_gpu_budget_cell_says_how_many_of_its_runs_trained_on_a_cpu():
    import report

    runs = [run_file(0, 0.30, "cuda", 0.05), run_file(1, 0.20, "cuda", 0.07),
            run_file(2, 0.25, "cpu", 9.0)]
    (row,) = report.summarize(runs, "main")
    assert row["per_seed"] == pytest.approx([30.0, 20.0, 25.0])
    assert row["seconds_per_step"] == pytest.approx(0.06)  # the CPU run's 9 s is left out
    assert report.fmt_cell(row) == "25.0 ± 5.0 (1 on CPU)"
    (gpu_only,) = report.summarize(runs[:2], "main")
    assert report.fmt_cell(gpu_only) == "25.0 ± 7.1 (n=2)"
