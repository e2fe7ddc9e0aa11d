"""The GEMM of every linear layer: F.linear, with the CPU's few-row float32 case as (W·xᵀ)ᵀ."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
