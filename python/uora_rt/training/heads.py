"""The task head an encoder adapter trains with: pool the hidden states, then one linear layer.

Pooling follows what the base declares (a sentence-transformers folder's mean / cls / max; [CLS]
for a plain BERT). The declared L2 normalization is left out on purpose: it exists for cosine
similarity, and a linear layer on unit vectors needs a far larger learning rate to move. The head
is stored inside the `.uora` file (core/format.py: `head.weight`, `head.bias`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uora_rt.core import format as fmt
from uora_rt.models.common import pool


class TaskHead(nn.Module):
    """task "classification" (outputs = classes, cross-entropy) or "regression" (one output,
    mean squared error). forward(hidden [B, L, H], valid [B, L]) -> [B, outputs] float32."""

    def __init__(self, task: str, pooling: str, hidden: int, outputs: int, seed: int = 0):
        super().__init__()
        if task not in fmt.HEAD_TASKS:
            raise ValueError(f"head task must be one of {fmt.HEAD_TASKS}, got {task!r}")
        if pooling not in fmt.HEAD_POOLINGS:
            raise ValueError(f"head pooling must be one of {fmt.HEAD_POOLINGS}, got {pooling!r}")
        self.task, self.pooling = task, pooling
        # nn.Linear's own init, drawn from a seeded generator so a run is reproducible.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.linear = nn.Linear(hidden, outputs)

    @classmethod
    def from_record(cls, head: fmt.Head) -> "TaskHead":
        out = cls(head.task, head.pooling, head.hidden, head.outputs)
        with torch.no_grad():
            out.linear.weight.copy_(head.weight)
            out.linear.bias.copy_(head.bias)
        return out

    def to_record(self) -> fmt.Head:
        return fmt.Head(self.task, self.pooling, self.linear.weight.detach().cpu().clone(),
                        self.linear.bias.detach().cpu().clone())

    def pool(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return pool(hidden, valid, self.pooling)

    def forward(self, hidden: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return F.linear(self.pool(hidden, valid), self.linear.weight.float(),
                        self.linear.bias.float())

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task == "classification":
            return F.cross_entropy(out.float(), target.long())
        return F.mse_loss(out.float()[:, 0], target.float())

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        return out.argmax(-1) if self.task == "classification" else out[:, 0]


def base_pooling(model) -> str:
    """The pooling a runtime encoder declares (models.bert.BertModel.pooling), [CLS] if none."""
    return getattr(model, "pooling", "") or "cls"
