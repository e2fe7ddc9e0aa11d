"""The study's data: GLUE tasks and E2E from the shared data folder, as rows of the training
pipeline's formats (text/label, text pair/label, messages), with fixed splits.

Held-out sets, reported once: SST-2, CoLA, RTE: GLUE dev; MRPC: the MSRP test set; STS-B: its test
set; E2E: the official test set. Learning rates are chosen on a validation split carved from the
training set (PILOT_VAL rows, seeded), never on the held-out sets.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data"
PILOT_VAL = 1000          # rows carved from train for the learning-rate pilot (at most 10%)
SPLIT_SEED = 1234

# task -> (primary metric, max tokens, kind)
TASKS = {
    "sst2": ("accuracy", 64, "classification"),
    "cola": ("mcc", 64, "classification"),
    "mrpc": ("accuracy", 128, "classification"),
    "stsb": ("pearson", 128, "regression"),
    "rte": ("accuracy", 128, "classification"),
}


def _tsv(path, skip_header):
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r for r in rows[1 if skip_header else 0:] if r]


def _sst2(d: Path, split):
    name = "train_full.tsv" if split == "train" else "dev.tsv"
    return [{"text": r[0].strip(), "label": int(r[1])} for r in _tsv(d / "glue/SST-2" / name, True)]


def _cola(d: Path, split):
    names = ["train.tsv", "val.tsv"] if split == "train" else ["dev.tsv"]  # GLUE train = both
    return [{"text": r[3], "label": int(r[1])}
            for n in names for r in _tsv(d / "glue/CoLA" / n, False)]


def _rte(d: Path, split):
    names = ["train.tsv", "val.tsv"] if split == "train" else ["dev.tsv"]
    rows = []
    for n in names:
        body = _tsv(d / "glue/RTE" / n, n != "val.tsv")
        rows += [{"text": r[1], "text_pair": r[2], "label": int(r[3] == "not_entailment")}
                 for r in body]
    return rows


def _mrpc(d: Path, split):
    name = "msr_paraphrase_train.txt" if split == "train" else "msr_paraphrase_test.txt"
    return [{"text": r[3], "text_pair": r[4], "label": int(r[0])}
            for r in _tsv(d / "glue/MRPC" / name, True)]


def _stsb(d: Path, split):
    name = "sts-train.tsv" if split == "train" else "sts-test.tsv"
    # Some lines carry extra columns after the pair: columns 4-6 are score, sentence 1, 2.
    return [{"text": r[5], "text_pair": r[6], "label": float(r[4])}
            for r in _tsv(d / "glue/STS-B" / name, False)]


_READERS = {"sst2": _sst2, "cola": _cola, "rte": _rte, "mrpc": _mrpc, "stsb": _stsb}


def load(task: str, data_dir, stage: str, budget: dict) -> tuple[list[dict], list[dict]]:
    """(train rows, evaluation rows). stages "pilot" and "confirm": train minus a validation
    split, evaluated on that split; otherwise the whole training set (or the budget's subset of it),
    evaluated on
    the held-out set. budget: {"train": max rows or None, "eval": max rows or None}."""
    d = Path(data_dir)
    train = _READERS[task](d, "train")
    rng = random.Random(SPLIT_SEED)
    order = list(range(len(train)))
    rng.shuffle(order)
    n_val = min(PILOT_VAL, len(train) // 10)
    if stage in ("pilot", "confirm"):
        ev = [train[i] for i in order[:n_val]]
        train = [train[i] for i in order[n_val:]]
    else:
        ev = _READERS[task](d, "test")
        train = [train[i] for i in order]
    if budget.get("train"):
        train = train[: budget["train"]]
    if budget.get("eval"):
        ev = ev[: budget["eval"]]
    return train, ev


# ------------------------------------------------------------------------------------- E2E

E2E_PROMPT = "Write one sentence describing this restaurant: {mr}"
E2E_HELDOUT_MRS = 47      # dev MRs held out of training (for the pilot), the rest trains


def _e2e_csv(path):
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    grouped: dict[str, list[str]] = {}
    for r in rows:
        grouped.setdefault(r["mr"], []).append(r["ref"])
    return grouped


def e2e(data_dir, stage: str, budget: dict):
    """(train chat rows, evaluation MRs with their references). The official training set is not
    in the data folder: training uses the dev set minus E2E_HELDOUT_MRS of its MRs; the pilot
    evaluates on those, the main runs on the official test set."""
    d = Path(data_dir) / "e2e"
    dev = _e2e_csv(d / "devset.csv")
    mrs = sorted(dev)
    random.Random(SPLIT_SEED).shuffle(mrs)
    held, train_mrs = mrs[:E2E_HELDOUT_MRS], mrs[E2E_HELDOUT_MRS:]
    train = [chat_row(mr, ref) for mr in train_mrs for ref in dev[mr]]
    random.Random(SPLIT_SEED).shuffle(train)
    evald = ([(mr, dev[mr]) for mr in held] if stage == "pilot"
             else sorted(_e2e_csv(d / "testset_w_refs.csv").items()))
    if budget.get("train"):
        train = train[: budget["train"]]
    if budget.get("eval"):
        evald = evald[: budget["eval"]]
    return train, evald


def chat_row(mr: str, ref: str) -> dict:
    return {"messages": [{"role": "user", "content": E2E_PROMPT.format(mr=mr)},
                         {"role": "assistant", "content": ref}]}
