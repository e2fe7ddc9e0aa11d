"""Pieces shared by the model families: adapter sites, the per-call adapter hook, KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Site:
    """Where an adaptable Hugging Face module lives in our fused model.

    name: the checkpoint's module name (e.g. model.layers.3.self_attn.k_proj);
    layer/group: which fused GEMM computes it (modules of one group read the same input);
    col: its first column in the group's fused output; out/inp: its (out, in) features.
    """

    name: str
    layer: int
    group: str
    col: int
    out: int
    inp: int


class AdapterHook:
    """How a model runs each fused group GEMM when adapters are present. The runtime supplies
    pool.AdapterBatch (serving) or trainer.TrainingHook (training); None = base model only."""

    def run(self, layer: int, group: str, linear, x: torch.Tensor) -> torch.Tensor:
        """Returns linear(x) plus the adapter deltas of this group ([..., n_out])."""
        y = linear(x)
        self.apply(layer, group, x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]))
        return y

    def apply(self, layer: int, group: str, x2d: torch.Tensor, y2d: torch.Tensor) -> None:
        raise NotImplementedError


def run_group(hook, layer, group, linear, x):
    """x: [..., in] -> [..., n_out]: the group's base GEMM and its adapter deltas."""
    return linear(x) if hook is None else hook.run(layer, group, linear, x)


class KVCache:
    """Preallocated keys/values: k, v [layers, batch, kv_heads, capacity, head_dim]."""

    def __init__(self, layers, batch, kv_heads, capacity, head_dim, dtype, device):
        shape = (layers, batch, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled so far (the same for every row: rows are left-padded)

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drops finished sequences: keeps only `rows` of the batch."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)

