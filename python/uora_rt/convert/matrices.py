"""The A and B an adapter file stands for, whatever its projection algorithm."""

from __future__ import annotations

import torch

from uora_rt.core import format as fmt
from uora_rt.kernels import ops
from uora_rt.core.projections import ALGORITHM, projections, vera_projections


def live_projections(adapter: fmt.Adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 CPU (A [r, max_in], B [max_out, r]) as the adapter's layers apply them.

    UORA: rebuilt from (seed, p) with ops.mix_projections, the op training uses, so they are the
    trained matrices bit for bit. PEFT VeRA: PEFT's own draw. Explicit: the stored matrices.
    """
    spec = adapter.projection
    if spec.algorithm == ALGORITHM:
        a0, b0, qa, qb = projections(spec.seed, spec.r, spec.max_in, spec.max_out)
        return ops.mix_projections(a0, qa, b0, qb, adapter.p.float().contiguous())
    if spec.algorithm == fmt.PEFT_VERA_ALGORITHM:
        return vera_projections(spec.seed, spec.r, spec.max_in, spec.max_out)
    if spec.algorithm == fmt.EXPLICIT_ALGORITHM:
        if adapter.explicit is None:
            raise ValueError(f"{adapter.path or '<adapter>'}: algorithm 'explicit' but the adapter "
                             "holds no projection.A/projection.B")
        return adapter.explicit[0].float(), adapter.explicit[1].float()
    raise ValueError(f"{adapter.path or '<adapter>'}: unknown projection algorithm "
                     f"{spec.algorithm!r}; known: {fmt.ALGORITHMS}")
