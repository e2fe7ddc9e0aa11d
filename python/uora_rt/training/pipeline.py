"""A JSONL file -> a trained `.uora` adapter (and back to metrics), on the runtime's own model:
what `uora-rt train` and `uora-rt eval` run. No transformers needed.

Order matters for the user: the data is read, validated and tokenized before the model's weights
load, so a bad file fails in a second with nothing written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from uora_rt.core import format as fmt
from uora_rt.core.config import UORAConfig
from uora_rt.errors import AdapterFormatError
from uora_rt.models import checkpoint
from uora_rt.models.common import PaddedAttention
from uora_rt.models.tokenizer import encoder_tokenizer
from uora_rt.training import data as data_mod
from uora_rt.training.heads import TaskHead, base_pooling
from uora_rt.training.inject import to_adapter
from uora_rt.training.loop import FitConfig, FitResult, fit
from uora_rt.training.objectives import DecoderObjective, EncoderObjective
from uora_rt.training.trainer import TrainingHook

# Defaults that give a useful adapter from a few dozen rows (docs/training.md says how they were
# chosen). Decoders: on 50 chat pairs SmolLM2's q/v at r 256 took on a reply style in 40 steps at
# 1e-1, not at 1e-2 or 2e-2 (nor with every linear layer at 2e-2, or at r 64 and 5e-2).
DEFAULTS = {
    "decoder": {"targets": ["q_proj", "v_proj"], "lr": 1e-1, "min_steps": 40},
    "encoder": {"targets": ["query", "value"], "lr": 3e-2, "min_steps": 0},
}
HEAD_LR = 1e-3


@dataclass
class TrainOptions:
    base: str | None
    data: str
    output: str
    eval_data: str | None = None
    r: int = 256
    target_modules: list[str] | None = None
    epochs: int | None = None
    max_steps: int | None = None
    lr: float | None = None
    head_lr: float = HEAD_LR
    batch_size: int = 8
    max_len: int = 256
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    progress: bool = True


@dataclass
class TrainedAdapter:
    """What `train` returns: the adapter (with its head for encoders) and how training went.
    `uora_rt.save_adapter(result, path)` writes it."""

    adapter: fmt.Adapter
    fit: FitResult
    kind: str
    device: str
    autocast: str | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        f = self.fit
        out = {"steps": f.steps, "epochs": round(f.epochs, 3), "seconds": round(f.seconds, 2),
               "seconds_per_step": round(f.seconds_per_step, 4),
               "final_train_loss": round(f.final_loss(), 5),
               "reinit_events": int(sum(f.reinit)),
               "adapter_parameters": self.adapter.num_parameters(),
               "head_parameters": self.adapter.head.num_parameters() if self.adapter.head else 0,
               "device": self.device, "autocast": self.autocast}
        if f.evals:
            best = next(e for e in f.evals if e["step"] == f.best_step)
            out["best_step"] = f.best_step
            out["eval"] = {k: v for k, v in best.items() if k not in ("step", "epoch")}
        return out


def resolve_device(device: str, dtype: str) -> tuple[str, torch.dtype | None]:
    """("cuda" | "cpu", autocast dtype or None). auto: the GPU when there is one, with bf16
    autocast; the CPU in float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available (torch "
                         f"{torch.__version__})")
    if dtype == "auto":
        return device, torch.bfloat16 if device.startswith("cuda") else None
    if dtype in ("float32", "fp32"):
        return device, None
    if dtype in ("bfloat16", "bf16"):
        return device, torch.bfloat16
    raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")


def architecture_name(config: dict) -> str:
    """The name an adapter file records for its base: the config's first architecture, else
    its model_type."""
    return (config.get("architectures") or [config.get("model_type", "?")])[0]


def base_kind(folder: Path) -> str:
    from uora_rt import models

    config = checkpoint.read_config(folder)
    archs = config.get("architectures") or []
    if any(a in models.DECODERS for a in archs) or config.get("model_type") in models.DECODER_TYPES:
        return "decoder"
    if any(a in models.ENCODERS for a in archs) or config.get("model_type") in models.ENCODER_TYPES:
        return "encoder"
    raise ValueError(f"{folder}: unsupported architecture {archs or config.get('model_type')!r}")


def prepare_data(folder: Path, kind: str, path, max_len: int, codec=None):
    """Reads, validates and tokenizes one file for this base. Returns (dataset, encoding)."""
    ds = data_mod.read_jsonl(path, kind, folder.name)
    if kind == "decoder":
        if codec is None:
            from uora_rt.models.tokenizer import TextCodec

            codec = TextCodec(folder)
        if ds.format == "messages" and codec.chat_template is None:
            raise data_mod.DataError(ds.path, ds.lines[0], "a base with a chat template for "
                                     "messages rows", "none in its tokenizer_config.json")
        return ds, data_mod.encode_decoder(ds, codec, max_len)
    return ds, data_mod.encode_encoder(ds, encoder_tokenizer(folder, max_len), max_len)


def build_objective(rt, hook, head, device):
    model = rt.model  # called without routes, a model runs the torch ops autograd needs
    if model.kind == "decoder":
        def logits(ids, valid, select):
            positions = (valid.long().cumsum(1) - 1).clamp(min=0)
            return model(ids, positions, PaddedAttention(valid), hook, rows=select)

        return DecoderObjective(logits, rt.codec.pad_id if rt.codec else 0, device)
    return EncoderObjective(lambda ids, valid, types: model(ids, valid, hook, types)[0], head,
                            device, pad_id=model.spec.pad_id)


def _check_output(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--output {path}: the folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--output {path}: the folder {parent} is not writable")
    if path.is_dir():
        raise ValueError(f"--output {path}: is a folder; give a file name such as adapter.uora")


def train(opts: TrainOptions, log=print) -> TrainedAdapter:
    """Trains a UORA adapter (and, for encoders, its task head) from JSONL files."""
    import uora_rt
    from uora_rt.runtime import resolve_base

    out_path = Path(opts.output)
    _check_output(out_path)
    device, autocast = resolve_device(opts.device, opts.dtype)
    folder = resolve_base(opts.base)
    kind = base_kind(folder)
    ds, enc = prepare_data(folder, kind, opts.data, opts.max_len)
    log(f"data: {ds.path}: {ds.describe()}")
    notes = []
    for msg in [enc.warning(ds.path, opts.max_len)]:
        if msg:
            log(msg)
            notes.append(msg)
    ev_ds = ev_enc = None
    if opts.eval_data:
        ev_ds, ev_enc = prepare_data(folder, kind, opts.eval_data, opts.max_len)
        data_mod.check_eval_matches(ds, ev_ds)
        log(f"eval data: {ev_ds.path}: {ev_ds.describe()}")
        if ev_enc.truncated:
            log(ev_enc.warning(ev_ds.path, opts.max_len))
    d = DEFAULTS[kind]
    targets = opts.target_modules or d["targets"]
    lr = opts.lr if opts.lr is not None else d["lr"]
    epochs, max_steps = opts.epochs, opts.max_steps
    if epochs is None and max_steps is None:
        # Few rows: at least min_steps steps, so 50 chat pairs still make a useful adapter.
        per_epoch = -(-len(enc.examples) // opts.batch_size)
        epochs = max(3, -(-d["min_steps"] // per_epoch))
    rt = uora_rt.load(folder, device=device)
    config = UORAConfig(r=opts.r, target_modules=targets, seed=opts.seed)
    hook = TrainingHook(rt.model, config)
    head = None
    if kind == "encoder":
        outputs = ds.num_labels if ds.task == "classification" else 1
        head = TaskHead(ds.task, base_pooling(rt.model), rt.model.spec.hidden, outputs,
                        seed=opts.seed).to(device)
    objective = build_objective(rt, hook, head, device)
    arch = architecture_name(rt.config)

    def snapshot():
        adapter = to_adapter(hook, arch)
        adapter.head = head.to_record() if head is not None else None
        return adapter

    cfg = FitConfig(lr=lr, head_lr=opts.head_lr, epochs=epochs or 1, max_steps=max_steps,
                    batch_size=opts.batch_size, seed=opts.seed, device=device, autocast=autocast,
                    progress=opts.progress)
    total, _ = cfg.total_steps(len(enc.examples))
    log(f"training: {folder.name} ({kind}) on {device}"
        f"{', bf16 autocast' if autocast else ', float32'}; UORA r={opts.r} on {targets} "
        f"({sum(p.numel() for p in hook.parameters() if p.requires_grad):,} adapter parameters"
        f"{f', + {sum(p.numel() for p in head.parameters()):,} head' if head else ''}); "
        f"{total} steps of batch {opts.batch_size}, lr {lr:g}"
        f"{f', head lr {opts.head_lr:g}' if head else ''}")
    result = fit(objective, enc.examples, [p for p in hook.parameters() if p.requires_grad], cfg,
                 eval_examples=ev_enc.examples if ev_enc else None,
                 reinit=lambda: uora_rt.reinit_step(hook, sync=False), snapshot=snapshot,
                 head_params=list(head.parameters()) if head is not None else None)
    adapter = result.best
    adapter.training = {**adapter.training, "lr": lr, "steps": result.steps,
                        "batch_size": opts.batch_size, "max_len": opts.max_len}
    return TrainedAdapter(adapter, result, kind, device,
                          "bfloat16" if autocast else None, notes)


def train_chat_adapter(rt, pairs, config: UORAConfig, steps=20, lr=5e-2, batch_size=8, seed=0,
                       desc="training", max_len=512) -> fmt.Adapter:
    """Supervised fine-tuning of a UORA adapter on (prompt, response) pairs, on rt's decoder:
    each pair is a user turn and an assistant turn through the chat template (a base without
    one: prompt and completion as plain text), loss on the response, at a constant learning
    rate for `steps` steps. Returns the adapter (add it with rt.add_adapter(adapter, name) or
    save it with uora_rt.save_adapter)."""
    import uora_rt

    if rt.model.kind != "decoder" or rt.codec is None:
        raise ValueError("train_chat_adapter needs a decoder base with a tokenizer")
    if rt.codec.chat_template is not None:
        form, rows = "messages", [{"messages": [{"role": "user", "content": p},
                                                {"role": "assistant", "content": r}]}
                                  for p, r in pairs]
    else:
        form, rows = "prompt/completion", [{"prompt": p, "completion": r} for p, r in pairs]
    ds = data_mod.Dataset("<pairs>", form, rows, list(range(1, len(rows) + 1)))
    enc = data_mod.encode_decoder(ds, rt.codec, max_len)
    hook = TrainingHook(rt.model, config)
    device = str(rt.device)
    cfg = FitConfig(lr=lr, max_steps=steps, batch_size=batch_size, seed=seed, device=device,
                    schedule="constant", desc=desc)
    fit(build_objective(rt, hook, None, device), enc.examples,
        [p for p in hook.parameters() if p.requires_grad], cfg,
        reinit=lambda: uora_rt.reinit_step(hook, sync=False))
    return to_adapter(hook, architecture_name(rt.config))


def hook_for_adapter(rt, adapter: fmt.Adapter) -> TrainingHook:
    """A TrainingHook on rt's model holding `adapter` (for evaluation through the training
    forward). Refuses an adapter made for other modules or shapes."""
    modules = {s.name: [s.out, s.inp] for s in rt.model.sites()}
    for t in adapter.targets:
        if modules.get(t) != list(adapter.base["modules"][t]):
            raise AdapterFormatError(adapter.path or "<adapter>", f"__metadata__.base.modules.{t}",
                                     f"{modules.get(t) or 'absent'} in this base",
                                     adapter.base["modules"][t])
    if adapter.projection.algorithm != uora_algorithm():
        raise AdapterFormatError(adapter.path or "<adapter>", "__metadata__.projection.algorithm",
                                 repr(uora_algorithm()), repr(adapter.projection.algorithm))
    train = adapter.training
    config = UORAConfig(r=adapter.r, target_modules=list(adapter.targets),
                        seed=adapter.projection.seed,
                        **{k: train[k] for k in ("d_initial", "alpha", "tau", "k") if k in train})
    hook = TrainingHook(rt.model, config)
    shared = hook.adapters[0].uora_shared
    with torch.no_grad():
        for a in hook.adapters:
            a.lambda_b.copy_(adapter.lambda_b[a.site.name])
            a.lambda_d.copy_(adapter.lambda_d[a.site.name])
        shared.p.copy_(adapter.p)
        shared.events.copy_(adapter.count)
        shared.rebuild()
    return hook


def uora_algorithm() -> str:
    from uora_rt.core.projections import ALGORITHM

    return ALGORITHM


def evaluate(base, adapter_path, data_path, max_len=256, batch_size=16, device="auto",
             dtype="auto", log=print) -> dict:
    """Metrics of an adapter (and its head) on a JSONL file: one dict."""
    import uora_rt
    from uora_rt.runtime import resolve_base

    device, autocast = resolve_device(device, dtype)
    adapter = fmt.load(adapter_path)
    folder = resolve_base(base)
    kind = base_kind(folder)
    ds, enc = prepare_data(folder, kind, data_path, max_len)
    if enc.truncated:
        log(enc.warning(ds.path, max_len))
    if kind == "encoder":
        if adapter.head is None:
            raise AdapterFormatError(adapter_path, "__metadata__.head", "a task head (train on "
                                     "text/label rows to get one)", "an adapter without a head")
        want = "classification" if ds.task == "classification" else "regression"
        if adapter.head.task != want:
            raise data_mod.DataError(ds.path, ds.lines[0], f"{adapter.head.task} labels for "
                                     f"this adapter's head", f"{want} labels")
        if want == "classification":
            for row, line in zip(ds.rows, ds.lines):
                if row["label"] >= adapter.head.outputs:
                    raise data_mod.DataError(ds.path, line, f"a label below "
                                             f"{adapter.head.outputs} (the head's classes)",
                                             row["label"])
    rt = uora_rt.load(folder, device=device)
    hook = hook_for_adapter(rt, adapter)
    head = TaskHead.from_record(adapter.head).to(device) if kind == "encoder" else None
    objective = build_objective(rt, hook, head, device)
    objective.train(False)
    from uora_rt.training.loop import autocast_context

    with torch.no_grad(), autocast_context(device, autocast):
        metrics = objective.evaluate(enc.examples, batch_size)
    return {"data": ds.path, "rows": len(ds.rows), "format": ds.format, **metrics}


def dumps(d: dict) -> str:
    return json.dumps(d, indent=None, sort_keys=False)
