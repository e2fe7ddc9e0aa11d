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
