"""Pieces shared by the model families: adapter sites, the group GEMM with its adapter hook,
tensor-parallel shards, padded attention."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uora_rt.kernels.dense import dense


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


def base_linear(linear, x):
    return dense(x, linear.weight, linear.bias)


@dataclass(frozen=True)
class Shard:
    """One rank's part of a tensor-parallel model (parallel/ builds it): the rank, the number of
    ranks and the in-place sum of a tensor over all of them."""

    rank: int
    world: int
    all_reduce: Callable[[torch.Tensor], None]


def run_group(hook, layer: int, group: str, linear, x, shard: Shard | None = None,
              row_parallel: bool = False):
    """x: [..., in] -> (y [..., n_out], extra): the group's base GEMM with its adapter deltas
    added, extra None; or, on the deferred route, y without them and extra their float32 sum,
    which the consumer kernel adds as it reads y. row_parallel: x is this rank's slice of the
    inputs, so the partial outputs are summed over the ranks (and the bias added once, after)."""
    if hook is not None:
        return hook.group(layer, group, linear, x, shard, row_parallel)
    if not row_parallel:
        return base_linear(linear, x), None
    y = dense(x, linear.weight)
    shard.all_reduce(y)
    if linear.bias is not None:
        y += linear.bias
    return y, None


class AdapterHook:
    """How a model runs each fused group GEMM when adapters are present: the runtime supplies
    adapters.batch.AdapterBatch (serving), training.trainer.TrainingHook (training); None =
    base model only. A subclass implements group, or apply (which adds the deltas in place)."""

    def group(self, layer: int, group: str, linear, x: torch.Tensor, shard: Shard | None = None,
              row_parallel: bool = False):
        """(y, extra) as run_group."""
        y, _ = run_group(None, layer, group, linear, x, shard, row_parallel)
        self.apply(layer, group, x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]))
        return y, None

    def apply(self, layer: int, group: str, x2d: torch.Tensor, y2d: torch.Tensor) -> None:
        raise NotImplementedError


class PaddedAttention:
    """Attention for a padded batch with no KV cache (Runtime.forward, training): causal within
    each row, padding keys hidden. valid: [B, L] bool (False = padding, on either side)."""

    def __init__(self, valid: torch.Tensor):
        self.valid = valid
        n = valid.shape[1]
        pos = torch.arange(n, device=valid.device)
        causal = pos[None, :] <= pos[:, None]                                # [L, L]
        # Each position may always see itself, so padding rows never softmax over nothing.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool,
                                                              device=valid.device)[None]
        self.mask = mask[:, None]                                            # [B, 1, L, L]
        # No padding: plain causal attention, which SDPA runs on its fast kernels on the CPU (an
        # explicit mask sends it to slower ones).
        self.causal_only = valid.device.type != "cuda" and bool(valid.all())

    def __call__(self, layer, q, k, v):
        """q [B, L, nH, hd], k, v [B, L, nKV, hd] -> [B, L, nH, hd]."""
        att = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=None if self.causal_only else self.mask, is_causal=self.causal_only,
            enable_gqa=q.shape[2] != k.shape[2])
        return att.transpose(1, 2)


def pool(hidden: torch.Tensor, valid: torch.Tensor, pooling: str) -> torch.Tensor:
    """hidden [B, L, H] -> [B, H] in float32 over the valid tokens: "mean", "max", or the first
    token ("cls"). What a task head reads, in training and in Runtime.classify alike."""
    hidden = hidden.float()
    if pooling == "mean":
        m = valid[..., None].float()
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    if pooling == "max":
        return hidden.masked_fill(~valid[..., None], float("-inf")).max(1).values
    return hidden[:, 0]
