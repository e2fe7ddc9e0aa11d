"""One training loop for every model and method: the `uora-rt train` command and the quality
study (UORA, PEFT VeRA and LoRA, full fine-tuning, head only) all go through `fit`.

AdamW, linear decay to 0 (or a constant rate) after an optional warm-up, random batches each
epoch from a seeded generator; evaluation after each epoch (and at the last step), the best state
by evaluation loss kept. On a GPU the forward runs under bf16 autocast when asked, and nothing
waits for the host each step: losses and reinit counts are gathered on the device and read every
few steps.
"""

from __future__ import annotations

import contextlib
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm


@dataclass
class FitConfig:
    lr: float
    head_lr: float | None = None     # the head's own group (None: no head group)
    epochs: int = 3
    max_steps: int | None = None     # wins over epochs when given
    batch_size: int = 8
    eval_batch_size: int = 64
    seed: int = 0
    weight_decay: float = 0.0
    warmup: float = 0.0              # fraction of the steps
    schedule: str = "linear"         # after the warm-up: "linear" decay to 0, or "constant"
    device: str = "cpu"
    autocast: torch.dtype | None = None
    progress: bool = True
    desc: str = "training"

    def total_steps(self, rows: int) -> tuple[int, int]:
        """(steps, steps per epoch)."""
        per_epoch = math.ceil(rows / self.batch_size)
        return (self.max_steps if self.max_steps else self.epochs * per_epoch), per_epoch


@dataclass
class FitResult:
    steps: int
    epochs: float
    seconds: float                    # training only (evaluation excluded)
    losses: list[float]               # per step
    reinit: list[int]                 # events per step
    evals: list[dict] = field(default_factory=list)   # {"step", "epoch", **metrics}
    best: Any = None                  # the snapshot kept (best evaluation loss, else the last)
    best_step: int | None = None
    peak_memory: int = 0              # bytes: CUDA max allocated, or the process's peak RSS

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / max(self.steps, 1)

    def final_loss(self, window: int = 20) -> float:
        tail = self.losses[-window:]
        return sum(tail) / max(len(tail), 1)


def autocast_context(device: str, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def fit(objective, train_examples: list, params: list, cfg: FitConfig, eval_examples=None,
        reinit: Callable[[], torch.Tensor] | None = None,
        snapshot: Callable[[], Any] | None = None, head_params: list | None = None) -> FitResult:
    """Trains `params` (lr) and `head_params` (head_lr) on `objective.loss(batch)`.

    objective: .batch(examples) -> batch, .loss(batch) -> scalar, .evaluate(examples, batch_size)
    -> metrics with "loss", .train(mode). reinit: called after each optimizer step, returns the
    events as a device tensor. snapshot: a CPU copy of what training produced (kept when the
    evaluation loss improves)."""
    groups = [{"params": params, "lr": cfg.lr}] if params else []
    if head_params:
        groups.append({"params": head_params, "lr": cfg.head_lr or cfg.lr})
    if not groups:
        raise ValueError("fit: nothing to train")
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    total, per_epoch = cfg.total_steps(len(train_examples))
    warm = int(cfg.warmup * total)
    if cfg.schedule not in ("linear", "constant"):
        raise ValueError(f"fit: schedule must be 'linear' or 'constant', got {cfg.schedule!r}")

    def factor(s):
        if s < warm:
            return (s + 1) / (warm + 1)
        return 1.0 if cfg.schedule == "constant" else max(0.0, (total - s) / max(total - warm, 1))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    every = 25 if device.type == "cuda" else 1   # how often the host reads the device's numbers
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = FitResult(0, 0.0, 0.0, [], [])
    best_loss = math.inf
    pending_loss, pending_reinit = [], []
    bar = tqdm(total=total, desc=cfg.desc, unit="step", disable=not cfg.progress, leave=False,
               dynamic_ncols=True)

    def drain():
        if pending_loss:
            result.losses.extend(torch.stack(pending_loss).float().tolist())
            pending_loss.clear()
        if pending_reinit:
            result.reinit.extend(int(v) for v in torch.stack(pending_reinit).tolist())
            pending_reinit.clear()

    def evaluate(epoch):
        nonlocal best_loss
        if eval_examples is None:
            return
        objective.train(False)
        with torch.no_grad(), autocast_context(cfg.device, cfg.autocast):
            metrics = objective.evaluate(eval_examples, cfg.eval_batch_size)
        objective.train(True)
        result.evals.append({"step": result.steps, "epoch": round(epoch, 4), **metrics})
        if metrics["loss"] < best_loss:
            best_loss = metrics["loss"]
            result.best_step = result.steps
            result.best = snapshot() if snapshot else None
        bar.write(f"  eval after step {result.steps} (epoch {epoch:.2f}): " + ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))

    objective.train(True)
    t_train = 0.0
    while result.steps < total:
        order = torch.randperm(len(train_examples), generator=gen).tolist()
        t0 = time.perf_counter()
        for start in range(0, len(order), cfg.batch_size):
            picked = order[start:start + cfg.batch_size]
            batch = objective.batch([train_examples[i] for i in picked])
            with autocast_context(cfg.device, cfg.autocast):
                loss = objective.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            pending_loss.append(loss.detach())
            if reinit is not None:
                pending_reinit.append(reinit())
            result.steps += 1
            if result.steps % every == 0 or result.steps == total:
                drain()
                recent = result.losses[-10:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}",
                                reinit=sum(result.reinit))
            bar.update(1)
            if result.steps >= total:
                break
        _sync(cfg.device)
        t_train += time.perf_counter() - t0
        drain()
        epoch = result.steps / per_epoch
        evaluate(epoch)
    bar.close()
    result.seconds, result.epochs = t_train, result.steps / per_epoch
    if result.best is None and snapshot is not None:  # no evaluation data: the last state
        result.best, result.best_step = snapshot(), result.steps
    result.peak_memory = peak_memory(cfg.device)
    return result
