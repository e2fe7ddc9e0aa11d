"""What `loop.fit` optimizes: batches of tokenized rows (training/data.py) -> a loss, and the
evaluation metrics. The model behind them is a function, so the runtime's own models and
transformers models (with UORA, PEFT or nothing) train through the same code.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from uora_rt.training import metrics
from uora_rt.training.data import Encoded


def pad(seqs: list[list[int]], value: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids and the [B, L] bool mask of real tokens."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), value, dtype=torch.long)
    valid = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        valid[i, : len(s)] = True
    return ids.to(device, non_blocking=True), valid.to(device, non_blocking=True)


class EncoderObjective:
    """encode(ids [B, L], valid [B, L], types [B, L]) -> hidden [B, L, H]; the head pools,
    classifies or regresses. modules: what train(mode) switches (dropout)."""

    def __init__(self, encode: Callable, head, device, pad_id: int = 0, modules=()):
        self.encode, self.head, self.device, self.pad_id = encode, head, device, pad_id
        self.modules = [m for m in (head, *modules) if m is not None]

    def train(self, mode: bool) -> None:
        for m in self.modules:
            m.train(mode)

    def batch(self, rows: list[Encoded]) -> dict:
        ids, valid = pad([r.ids for r in rows], self.pad_id, self.device)
        types, _ = pad([r.types or [0] * len(r.ids) for r in rows], 0, self.device)
        dtype = torch.long if self.head.task == "classification" else torch.float32
        label = torch.tensor([r.label for r in rows], dtype=dtype).to(self.device)
        return {"ids": ids, "valid": valid, "types": types, "label": label}

    def outputs(self, b: dict) -> torch.Tensor:
        return self.head(self.encode(b["ids"], b["valid"], b["types"]), b["valid"])

    def loss(self, b: dict) -> torch.Tensor:
        return self.head.loss(self.outputs(b), b["label"])

    def predict(self, rows: list[Encoded], batch_size: int) -> tuple[torch.Tensor, float]:
        """Predictions for every row (CPU) and the mean loss."""
        preds, loss_sum = [], 0.0
        for start in range(0, len(rows), batch_size):
            b = self.batch(rows[start:start + batch_size])
            out = self.outputs(b)
            loss_sum += float(self.head.loss(out, b["label"])) * len(b["label"])
            preds.append(self.head.predict(out).float().cpu())
        return torch.cat(preds), loss_sum / len(rows)

    def evaluate(self, rows: list[Encoded], batch_size: int = 64) -> dict:
        pred, loss = self.predict(rows, batch_size)
        gold = [r.label for r in rows]
        if self.head.task == "classification":
            found = metrics.classification_metrics(pred.long(), gold, self.head.linear.out_features)
        else:
            found = metrics.regression_metrics(pred, gold)
        return {"loss": loss, **found}


class DecoderObjective:
    """logits(ids [B, L], valid [B, L], select [B, L] bool) -> [N, V]: the logits of the N
    selected positions (row-major), each predicting the next token. Loss: mean cross-entropy over
    every target token of the batch."""

    def __init__(self, logits: Callable, pad_id: int, device, modules=()):
        self.logits, self.pad_id, self.device = logits, pad_id, device
        self.modules = list(modules)

    def train(self, mode: bool) -> None:
        for m in self.modules:
            m.train(mode)

    def batch(self, rows: list[Encoded]) -> dict:
        ids, valid = pad([r.ids for r in rows], self.pad_id, self.device)
        target = torch.zeros(ids.shape, dtype=torch.bool)
        for i, r in enumerate(rows):
            target[i, : len(r.ids)] = torch.tensor(r.target_mask)
        target = target.to(self.device)
        select = torch.zeros_like(target)
        select[:, :-1] = target[:, 1:]          # position t predicts token t + 1
        return {"ids": ids, "valid": valid, "select": select, "labels": ids[:, 1:][target[:, 1:]]}

    def loss_sum(self, b: dict) -> tuple[torch.Tensor, int]:
        logits = self.logits(b["ids"], b["valid"], b["select"])
        return F.cross_entropy(logits.float(), b["labels"], reduction="sum"), b["labels"].numel()

    def loss(self, b: dict) -> torch.Tensor:
        total, n = self.loss_sum(b)
        return total / max(n, 1)

    def evaluate(self, rows: list[Encoded], batch_size: int = 16) -> dict:
        loss_sum, tokens = 0.0, 0
        for start in range(0, len(rows), batch_size):
            total, n = self.loss_sum(self.batch(rows[start:start + batch_size]))
            loss_sum, tokens = loss_sum + float(total), tokens + n
        return metrics.language_model_metrics(loss_sum, tokens)
