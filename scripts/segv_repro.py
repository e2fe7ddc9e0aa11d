"""Reproduces the device-only crash of a failing argument check (a TORCH_CHECK whose message
formats integers), outside pytest."""
import torch

import uora_rt  # noqa: F401

for label, fn in [
    ("dtype message", lambda: torch.ops.uora.mix_projections(
        torch.zeros(8, 16), torch.zeros(8, 16), torch.zeros(16, 8), torch.zeros(16, 8),
        torch.ones(8, dtype=torch.float64))),
    ("shape message", lambda: torch.ops.uora.mix_projections(
        torch.zeros(8, 16), torch.zeros(8, 15), torch.zeros(16, 8), torch.zeros(16, 8),
        torch.ones(8))),
]:
    try:
        fn()
    except RuntimeError as e:
        print(label, "->", str(e).splitlines()[0], flush=True)
