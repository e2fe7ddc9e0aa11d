"""Training UORA adapters on the runtime's own model (no transformers needed).

The runtime's models call an adapter hook after every fused GEMM; for training that hook adds a
differentiable UORA delta per adapted site, with the same shared state (A, B, reinit record) and
reinit op as `uora_rt.inject`; training.pipeline trains it (the `uora-rt train` command and
`train_chat_adapter`), and the result is an ordinary `.uora` adapter for that base.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from uora_rt.core.config import UORAConfig
from uora_rt.training.layers import UORAShared
from uora_rt.models.common import AdapterHook
from uora_rt.core.projections import ALGORITHM, ProjectionSpec, check_family


class SiteAdapter(nn.Module):
    """The trainable vectors of one adapted site (what UORALinear holds, minus the base layer)."""

    def __init__(self, site, shared: UORAShared, d_initial: float):
        super().__init__()
        self.site, self.out_features, self.in_features = site, site.out, site.inp
        self.lambda_b = nn.Parameter(torch.zeros(site.out, device=shared.A.device))
        self.lambda_d = nn.Parameter(torch.full((shared.spec.r,), float(d_initial),
                                                device=shared.A.device))
        object.__setattr__(self, "shared", shared)

    def delta(self, x2d):
        h = F.linear(x2d.float(), self.shared.A[:, : self.in_features]) * self.lambda_d
        return F.linear(h, self.shared.B[: self.out_features]) * self.lambda_b


class TrainingHook(nn.Module, AdapterHook):
    """An adapter hook with trainable UORA vectors for the sites `config.target_modules` names."""

    def __init__(self, model, config: UORAConfig):
        super().__init__()
        targets = config.target_modules or ["q_proj", "v_proj"]
        sites = [s for s in model.sites()
                 if (re.fullmatch(targets, s.name) if isinstance(targets, str)
                     else any(s.name == t or s.name.endswith("." + t) for t in targets))]
        if not sites:
            raise ValueError(f"target_modules={targets!r} matched none of the model's sites")
        spec = ProjectionSpec(ALGORITHM, config.seed, config.r, max(s.inp for s in sites),
                              max(s.out for s in sites))
        check_family(spec.seed, spec.r, spec.max_in, spec.max_out)
        device = next(model.parameters()).device
        shared = UORAShared(config, spec, [s.name for s in sites], device)
        self.adapters = nn.ModuleList(SiteAdapter(s, shared, config.d_initial) for s in sites)
        shared.layers.extend(self.adapters)
        self.adapters[0].add_module("uora_shared", shared)
        self.by_group: dict = {}
        for a in self.adapters:
            self.by_group.setdefault((a.site.layer, a.site.group), []).append(a)

    def apply(self, layer, group, x2d, y2d):
        for a in self.by_group.get((layer, group), ()):
            cols = y2d[:, a.site.col: a.site.col + a.site.out]
            cols.add_(a.delta(x2d).to(y2d.dtype))  # in place on the GEMM output; autograd-safe
