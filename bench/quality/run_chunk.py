"""One run of the quality study: one (stage, task, method, r, seed, learning rates), written to
its own JSON file (atomically; a file that exists means the run is done).

    python bench/quality/run_chunk.py '{"stage": "main", "task": "sst2", "method": "uora", "r": 256,
        "seed": 0, "lr": 0.03, "head_lr": 0.001, "budget": "tiny", "device": "cpu"}' --out FILE

run_grid.py builds these specs; run one by hand to reproduce a single cell.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import budgets  # noqa: E402
import glue  # noqa: E402
import methods  # noqa: E402

from uora_rt.models.tokenizer import encoder_tokenizer  # noqa: E402
from uora_rt.training import data as data_mod  # noqa: E402
from uora_rt.training.heads import TaskHead  # noqa: E402
from uora_rt.training.loop import FitConfig, fit  # noqa: E402
from uora_rt.training.objectives import DecoderObjective, EncoderObjective  # noqa: E402


def git_sha() -> str:
    """The commit that ran; UORA_RT_GIT_SHA wins (a copied tree's .git may be an older one)."""
    if os.environ.get("UORA_RT_GIT_SHA"):
        return os.environ["UORA_RT_GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=glue.REPO, text=True,
                              capture_output=True).stdout.strip()
    except OSError:
        return "?"


def data_dir(spec):
    """The data folder: the driver's --data, or ../shared/data beside the repository."""
    return os.environ.get("UORA_STUDY_DATA") or str(glue.DEFAULT_DATA)


def dataset(rows, name, fmt_name):
    return data_mod.Dataset(name, fmt_name, rows, list(range(1, len(rows) + 1)))


def curves(result, points=200):
    """The loss curve (mean per bucket of steps, at most `points`) and the reinit events
    as [step, events] pairs."""
    n = len(result.losses)
    size = max(1, -(-n // points))
    loss = [[min(i + size, n), sum(result.losses[i:i + size]) / len(result.losses[i:i + size])]
            for i in range(0, n, size)]
    events = [[s + 1, e] for s, e in enumerate(result.reinit) if e]
    return {"loss": loss, "reinit": events}


def fit_config(spec, budget, rows):
    device = spec["device"]
    return FitConfig(lr=spec["lr"] or spec["head_lr"], head_lr=spec["head_lr"],
                     epochs=budget.get("epochs", 1), max_steps=budget.get("max_steps"),
                     batch_size=budget["batch"], seed=spec["seed"], device=device,
                     autocast=torch.bfloat16 if device.startswith("cuda") else None,
                     progress=False)


def run_glue(spec) -> dict:
    task, device = spec["task"], spec["device"]
    metric, max_len, kind = glue.TASKS[task]
    budget = budgets.for_run(spec["budget"], task, spec["stage"])
    train_rows, eval_rows = glue.load(task, data_dir(spec), spec["stage"], budget)
    from uora_rt.models.assets import minilm_dir

    tok = encoder_tokenizer(minilm_dir(), max_len)
    fmt_name = "text pair/label" if "text_pair" in train_rows[0] else "text/label"
    train = data_mod.encode_encoder(dataset(train_rows, task, fmt_name), tok, max_len)
    evald = data_mod.encode_encoder(dataset(eval_rows, task, fmt_name), tok, max_len)
    torch.manual_seed(spec["seed"])
    model = methods.load_encoder(device)
    built = methods.build(spec["method"], model, spec["r"], spec["seed"], methods.ENCODER_TARGETS)
    model = built.model
    outputs = 2 if kind == "classification" else 1
    head = TaskHead(kind, "mean", model.config.hidden_size, outputs, seed=spec["seed"]).to(device)

    def encode(ids, valid, types):
        out = model(input_ids=ids, attention_mask=valid.long(), token_type_ids=types)
        return out.last_hidden_state

    objective = EncoderObjective(encode, head, device, pad_id=0, modules=built.train_modules)
    cfg = fit_config(spec, budget, len(train.examples))
    result = fit(objective, train.examples, built.params, cfg, reinit=built.reinit,
                 head_params=list(head.parameters()))
    objective.train(False)
    with torch.no_grad(), torch.autocast(torch.device(device).type, torch.bfloat16,
                                         enabled=device.startswith("cuda")):
        scores = objective.evaluate(evald.examples, 128)
    return {"metric": metric, "score": scores[metric], "metrics": scores,
            "train_rows": len(train.examples), "eval_rows": len(evald.examples),
            "truncated_train_rows": train.truncated, "adapter_params": built.adapter_params,
            "head_params": sum(p.numel() for p in head.parameters()), "fit": result}


def run_e2e(spec) -> dict:
    import e2e_eval

    device, budget = spec["device"], budgets.for_run(spec["budget"], "e2e", spec["stage"])
    train_rows, eval_mrs = glue.e2e(data_dir(spec), spec["stage"], budget)
    torch.manual_seed(spec["seed"])
    model, folder = methods.load_decoder(device)
    from uora_rt.models.tokenizer import TextCodec

    codec = TextCodec(folder)
    train = data_mod.encode_decoder(dataset(train_rows, "e2e", "messages"), codec, 256)
    out = {"train_rows": len(train.examples), "eval_mrs": len(eval_mrs)}
    if spec["method"] == "base":
        built, result = methods.Built(model, [], None, [], 0), None
    else:
        built = methods.build(spec["method"], model, spec["r"], spec["seed"],
                              methods.DECODER_TARGETS)

        def logits(ids, valid, select):
            return built.model(input_ids=ids, attention_mask=valid.long()).logits[select]

        objective = DecoderObjective(logits, codec.pad_id, device, modules=built.train_modules)
        result = fit(objective, train.examples, built.params,
                     fit_config(spec, budget, len(train.examples)), reinit=built.reinit)
    model = built.model
    model.eval()
    if spec["stage"] == "pilot":  # teacher-forced loss on the held-out dev MRs' references
        rows = [glue.chat_row(mr, ref) for mr, refs in eval_mrs for ref in refs]
        evald = data_mod.encode_decoder(dataset(rows, "e2e-val", "messages"), codec, 256)
        def logits_of(ids, valid, select):
            return model(input_ids=ids, attention_mask=valid.long()).logits[select]

        objective = DecoderObjective(logits_of, codec.pad_id, device)
        with torch.no_grad():
            scores = objective.evaluate(evald.examples, 16)
        out.update(metric="neg_loss", score=-scores["loss"], metrics=scores)
    else:
        scores, samples = e2e_eval.generate_and_score(model, codec, eval_mrs, device)
        out.update(metric="bleu", score=scores["bleu"], metrics=scores, samples=samples[:20])
    out.update(adapter_params=built.adapter_params, head_params=0, fit=result)
    return out


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="the run as JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    spec = json.loads(args.spec)
    quiet_transformers()
    threads = os.environ.get("UORA_STUDY_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    t0 = time.time()
    found = run_e2e(spec) if spec["task"] == "e2e" else run_glue(spec)
    result = found.pop("fit")
    record = {"spec": spec, **found,
              "steps": result.steps if result else 0,
              "epochs": result.epochs if result else 0,
              "train_seconds": round(result.seconds, 2) if result else 0,
              "seconds_per_step": round(result.seconds_per_step, 5) if result else None,
              "peak_memory_bytes": result.peak_memory if result else None,
              "final_train_loss": result.final_loss() if result else None,
              "reinit_events": int(sum(result.reinit)) if result else 0,
              "curves": curves(result) if result else None,
              "wall_seconds": round(time.time() - t0, 1), "git": git_sha(),
              "host": {"device": spec["device"], "cuda": torch.cuda.get_device_name(0)
                       if torch.cuda.is_available() else None, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": platform.python_version()}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, out)
    print(f"{out.name}: {record['metric']} {record['score']:.4f} ({record['steps']} steps, "
          f"{record['wall_seconds']} s)")


if __name__ == "__main__":
    main()
