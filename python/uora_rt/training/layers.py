"""Training-side modules: the adapted linear layer and the model-level shared UORA state."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uora_rt.kernels import ops
from uora_rt.core.config import UORAConfig
from uora_rt.core.projections import ProjectionSpec, projections
from uora_rt.core.targets import linear_dims


class UORAShared(nn.Module):
    """A, B (live, float32), their initial factors and targets, and the reinit record, shared by
    every adapted layer of one model (A/B are shared across layers in UORA, as in VeRA).

    p, counts and events are persistent (a state_dict resumes training exactly); A and B are not:
    they are rebuilt from (A0, QA, B0, QB, p) when a state_dict is loaded.
    """

    def __init__(self, config: UORAConfig, spec: ProjectionSpec, names: list[str], device):
        super().__init__()
        self.config = config
        self.spec = spec
        self.names = list(names)
        a0, b0, qa, qb = projections(spec.seed, spec.r, spec.max_in, spec.max_out)
        for name, t in (("A0", a0), ("B0", b0), ("QA", qa), ("QB", qb)):
            self.register_buffer(name, t.to(device, copy=True), persistent=False)
        self.register_buffer("A", self.A0.clone(), persistent=False)
        self.register_buffer("B", self.B0.clone(), persistent=False)
        r = spec.r
        self.register_buffer("p", torch.ones(r, device=device))
        self.register_buffer("counts", torch.zeros(len(names), r, dtype=torch.int32, device=device))
        self.register_buffer("events", torch.zeros(r, dtype=torch.int32, device=device))
        self.layers: list[UORALinear] = []  # plain list: the layers are registered in the model

    def rebuild(self) -> None:
        """A, B <- mix(A0, QA, B0, QB, p), bit-identical to the live training values."""
        a, b = ops.mix_projections(self.A0, self.QA, self.B0, self.QB, self.p)
        self.A.copy_(a)
        self.B.copy_(b)

    def _apply(self, fn, recurse=True):
        # model.half() / .to(bfloat16) must not touch projections or counters: keep their dtypes.
        dtypes = {n: b.dtype for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, dt in dtypes.items():
            if self._buffers[n].dtype != dt:
                self._buffers[n] = self._buffers[n].to(dt)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        with torch.no_grad():
            self.rebuild()


class UORALinear(nn.Module):
    """y = base(x) + lambda_b * (B[:out] (lambda_d * (A[:, :in] dropout(x)))), adapter in float32.

    Wraps nn.Linear or transformers' Conv1D. Only lambda_b and lambda_d are trainable.
    """

    def __init__(self, base: nn.Module, shared: UORAShared, index: int, dropout: float,
                 d_initial: float):
        super().__init__()
        dims = linear_dims(base)
        if dims is None:
            raise TypeError(f"UORALinear wraps nn.Linear or Conv1D, got {type(base).__name__}")
        self.out_features, self.in_features = dims
        self.conv1d = not isinstance(base, nn.Linear)
        self.base_layer = base
        self.index = index
        device = base.weight.device
        r = shared.spec.r
        self.lambda_b = nn.Parameter(torch.zeros(self.out_features, device=device))
        self.lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # not a submodule: it is registered once, at the root
        object.__setattr__(self, "shared", shared)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        a = self.shared.A[:, : self.in_features]
        b = self.shared.B[: self.out_features]
        h = F.linear(self.dropout(x).float(), a) * self.lambda_d
        return F.linear(h, b) * self.lambda_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Delta W = (lambda_b * B[:out]) (lambda_d * A[:, :in]), float32 [out, in]."""
        a = self.shared.A[:, : self.in_features] * self.lambda_d[:, None]
        b = self.shared.B[: self.out_features] * self.lambda_b[:, None]
        return b @ a

    def _apply(self, fn, recurse=True):
        # Keep the trainable vectors in float32 when the base model is cast (as PEFT does).
        super()._apply(fn, recurse)
        for n in ("lambda_b", "lambda_d"):
            p = self._parameters[n]
            if p is not None and p.dtype != torch.float32:
                p.data = p.data.float()
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.shared.spec.r}"
