"""Pieces shared by the model families: adapter sites, the adapter hook, padded attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


# Up to this many rows, a float32 CPU GEMM runs as W·xᵀ instead of x·Wᵀ: MKL's sgemm with few
# rows of x streams W at a fraction of the memory bandwidth, the transposed problem does not.
# Measured on SmolLM2-135M's weights (2 cores): 4 rows 49 vs 116 ms, 16 rows 82 vs 136 ms, 64
# rows 171 vs 198 ms, 1 row 57 vs 60 ms; from 128 rows on x·Wᵀ is as fast or faster.
SKINNY_ROWS = 64


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """F.linear(x, weight, bias), with the CPU's few-row case computed as (W·xᵀ)ᵀ. Inference
    only (autograd takes F.linear); the two differ by float32 rounding, not more."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or not 1 < rows <= SKINNY_ROWS
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        return F.linear(x, weight, bias)
    y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


def base_linear(linear, x):
    return dense(x, linear.weight, linear.bias)


class AdapterHook:
    """How a model runs each fused group GEMM when adapters are present. The runtime supplies
    pool.AdapterBatch (serving) or trainer.TrainingHook (training); None = base model only."""

    def run(self, layer: int, group: str, linear, x: torch.Tensor) -> torch.Tensor:
        """Returns linear(x) plus the adapter deltas of this group ([..., n_out])."""
        y = base_linear(linear, x)
        self.apply(layer, group, x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1]))
        return y

    def apply(self, layer: int, group: str, x2d: torch.Tensor, y2d: torch.Tensor) -> None:
        raise NotImplementedError

    def run_deferred(self, layer: int, group: str, linear, x: torch.Tensor):
        """(y, extra): linear(x) and None, or linear(x) alone and the adapter deltas as a
        float32 tensor of its shape that the caller adds (models.fused.Kernels.group)."""
        return self.run(layer, group, linear, x), None


def run_group(hook, layer, group, linear, x):
    """x: [..., in] -> [..., n_out]: the group's base GEMM and its adapter deltas."""
    return base_linear(linear, x) if hook is None else hook.run(layer, group, linear, x)


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
