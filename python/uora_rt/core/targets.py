"""Which modules an adapter can target: nn.Linear and transformers' GPT-2 Conv1D."""

from __future__ import annotations

from torch import nn


def conv1d_class():
    """transformers' GPT-2 Conv1D (weight stored [in, out]), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional at run time
        return None
    return Conv1D


def linear_dims(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of an adaptable module, or None if it is not one."""
    conv1d = conv1d_class()
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.shape[1], module.weight.shape[0]
    return None
