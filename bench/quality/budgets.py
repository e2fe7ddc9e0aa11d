"""Training budgets and the study's grids: which runs each stage makes.

Budgets: "tiny" checks the harness in minutes on a laptop CPU; "cpu" is the 2-core budget of the
first pilot (SST-2 on an 8,000-row subset); "gpu" trains on the full training sets.
"""

from __future__ import annotations

# task -> {"train": max rows (None = all), "eval": max rows, "epochs" | "max_steps", "batch"}
BUDGETS = {
    "tiny": {**{t: {"train": 128, "eval": 64, "max_steps": 12, "batch": 16}
                for t in ("sst2", "cola", "mrpc", "stsb", "rte")},
             "e2e": {"train": 32, "eval": 6, "max_steps": 3, "batch": 4}},
    "cpu": {"sst2": {"train": 8000, "epochs": 2, "batch": 32},
            "cola": {"epochs": 3, "batch": 32}, "mrpc": {"epochs": 3, "batch": 32},
            "stsb": {"epochs": 3, "batch": 32}, "rte": {"epochs": 3, "batch": 32},
            "e2e": {"train": 1200, "epochs": 1, "batch": 8}},
    "gpu": {"sst2": {"epochs": 1, "batch": 32, "pilot": {"max_steps": 1000}},
            **{t: {"epochs": 10, "batch": 32, "pilot": {"epochs": 3}}
               for t in ("cola", "mrpc", "stsb", "rte")},
            "e2e": {"epochs": 2, "batch": 16}},
}


def for_run(budget: str, task: str, stage: str) -> dict:
    """A task's budget for one stage: the pilot may run shorter (its "pilot" entry), so that
    choosing learning rates costs a fraction of the main grid."""
    b = dict(BUDGETS[budget][task])
    short = b.pop("pilot", {})
    if stage == "pilot":
        b.update(short)
    return b

MAIN_TASKS = ("sst2", "cola", "mrpc", "stsb")
RANK_TASKS = ("sst2", "cola")
SEEDS = (0, 1, 2)
MAIN_R = {"uora": 256, "uora_noreinit": 256, "vera": 256, "lora": 8, "full": 0, "head": 0}
# UORA's rows of A are orthonormal, so r <= min(in, out) = 384 on MiniLM; PEFT's VeRA draws
# Kaiming factors and also runs at r = 1024.
RANK_SWEEP = {"lora": (1, 8), "vera": (32, 256, 384, 1024), "uora": (32, 256, 384)}

# The pilot's learning rates (adapter / encoder) and head learning rates per method.
PILOT_LR = {"uora": (1e-2, 3e-2, 1e-1), "vera": (1e-2, 3e-2, 1e-1), "lora": (3e-4, 1e-3, 3e-3),
            "full": (2e-5, 5e-5, 1e-4), "head": (0.0,)}
PILOT_HEAD_LR = {"head": (1e-3, 1e-2, 1e-1)}
DEFAULT_HEAD_LRS = (1e-3, 1e-2)
E2E_METHODS = ("uora", "vera", "lora")
E2E_PILOT_LR = {"uora": (1e-2, 3e-2, 1e-1), "vera": (1e-2, 3e-2, 1e-1), "lora": (3e-4, 1e-3, 3e-3)}
E2E_R = {"uora": 256, "vera": 256, "lora": 8}


def preference(score: float, spec: dict) -> tuple:
    """How settings rank in the pilot and confirm stages: the better validation score, on ties
    the smaller learning rate, then the smaller head learning rate (larger tuple = preferred)."""
    return (score, -spec["lr"], -spec["head_lr"])


def head_lrs(method):
    return PILOT_HEAD_LR.get(method, DEFAULT_HEAD_LRS)
