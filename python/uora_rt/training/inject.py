"""The training-side API: inject, reinit_step, merge/unmerge, save_adapter/load_adapter."""

from __future__ import annotations

import re

import torch
from torch import nn

from uora_rt.core import format as fmt
from uora_rt.kernels import ops
from uora_rt.core.config import DEFAULT_TARGETS, UORAConfig
from uora_rt.errors import AdapterFormatError
from uora_rt.core.targets import linear_dims
from uora_rt.training.layers import UORALinear, UORAShared
from uora_rt.core.projections import ALGORITHM, ProjectionSpec, check_family



def _resolve_targets(model: nn.Module, config: UORAConfig) -> list[str]:
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(f"UORAConfig.target_modules is None and model type {model_type!r} has "
                             f"no default; known: {sorted(DEFAULT_TARGETS)}")
        targets = DEFAULT_TARGETS[model_type]
    names = []
    for name, module in model.named_modules():
        if linear_dims(module) is None:
            continue
        if isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            names.append(name)
    if not names:
        candidates = [n for n, m in model.named_modules() if linear_dims(m) is not None][:8]
        raise ValueError(f"inject: target_modules={targets!r} matched no nn.Linear/Conv1D; "
                         f"linear modules include {candidates}")
    return names


def model_architecture(model: nn.Module) -> str:
    return type(model).__name__


def find_shared(model: nn.Module) -> UORAShared | None:
    return next((m for m in model.modules() if isinstance(m, UORAShared)), None)


def shared_state(model: nn.Module) -> UORAShared:
    shared = find_shared(model)
    if shared is None:
        raise ValueError("this model has no UORA adapter: call uora_rt.inject(model, config) first")
    return shared


def inject(model: nn.Module, config: UORAConfig | None = None, *,
           _spec: ProjectionSpec | None = None):
    """Wraps the targeted linear layers of `model` in UORALinear (in place) and freezes everything
    but the lambda vectors. Returns the model."""
    config = config or UORAConfig()
    if find_shared(model) is not None:
        raise ValueError("inject: this model already has a UORA adapter")
    names = _resolve_targets(model, config)
    modules = dict(model.named_modules())
    dims = {n: linear_dims(modules[n]) for n in names}
    max_out = max(d[0] for d in dims.values())
    max_in = max(d[1] for d in dims.values())
    spec = _spec or ProjectionSpec(ALGORITHM, config.seed, config.r, max_in, max_out)
    check_family(spec.seed, spec.r, spec.max_in, spec.max_out)
    device = next(iter(modules[names[0]].parameters())).device
    shared = UORAShared(config, spec, names, device)
    for p in model.parameters():
        p.requires_grad_(False)
    for index, name in enumerate(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = UORALinear(modules[name], shared, index, config.dropout, config.d_initial)
        setattr(parent, child, layer)
        shared.layers.append(layer)
    # The shared state is registered once, under the first adapted layer, so model.to()/.cuda()
    # and state_dict() see it exactly once whatever the model's container type (a root-level
    # child would break nn.Sequential).
    shared.layers[0].add_module("uora_shared", shared)
    return model


def adapter_layers(model: nn.Module) -> list[tuple[str, UORALinear]]:
    shared = shared_state(model)
    return list(zip(shared.names, shared.layers))


@torch.no_grad()
def reinit_step(model: nn.Module, sync: bool = True):
    """Runs the reinitialization rule once (call after each optimizer step).

    Returns the number of events fired: an int, or with sync=False a 0-dim device tensor, so a
    CUDA training loop never waits for the host.
    """
    shared = shared_state(model)
    lam = torch.stack([layer.lambda_d.detach() for layer in shared.layers])
    cfg = shared.config
    fires = ops.reinit_(lam, shared.counts, shared.p, shared.A, shared.B, shared.A0, shared.QA,
                        shared.B0, shared.QB, cfg.tau, cfg.k, cfg.alpha)
    shared.events += fires
    total = fires.sum()
    return int(total) if sync else total


@torch.no_grad()
def merge(model: nn.Module) -> None:
    """Folds the adapter into the base weights: zero overhead, same outputs up to rounding."""
    for _, layer in adapter_layers(model):
        if layer.merged:
            raise ValueError("merge: the adapter is already merged")
        _add_delta(layer, +1.0)
        layer.merged = True


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Subtracts a merged adapter from the base weights again (exact up to rounding)."""
    for _, layer in adapter_layers(model):
        if not layer.merged:
            raise ValueError("unmerge: the adapter is not merged")
        _add_delta(layer, -1.0)
        layer.merged = False


def _add_delta(layer: UORALinear, sign: float) -> None:
    w = layer.base_layer.weight
    delta = layer.delta_weight()
    if layer.conv1d:
        delta = delta.T
    w.copy_((w.float() + sign * delta).to(w.dtype))


def to_adapter(model: nn.Module, architecture: str | None = None) -> fmt.Adapter:
    """The model's adapter as an in-memory `.uora` record (CPU copies)."""
    shared = shared_state(model)
    cfg = shared.config
    layers = adapter_layers(model)
    return fmt.Adapter(
        projection=shared.spec,
        targets=[n for n, _ in layers],
        lambda_b={n: l.lambda_b.detach().cpu().clone() for n, l in layers},
        lambda_d={n: l.lambda_d.detach().cpu().clone() for n, l in layers},
        p=shared.p.detach().cpu().clone(),
        count=shared.events.detach().cpu().clone(),
        base={"architecture": architecture or model_architecture(model),
              "modules": {n: [l.out_features, l.in_features] for n, l in layers}},
        training=cfg.training_record(),
    )


def save_adapter(adapter, path) -> None:
    """Writes a `.uora` file (atomically) from any training path's result: a model with UORA
    injected (`inject`), an in-memory adapter (`train_chat_adapter`, `format.load`), or what
    `uora_rt.training.pipeline.train` returns (adapter and task head)."""
    if isinstance(adapter, fmt.Adapter):
        record = adapter
    elif isinstance(getattr(adapter, "adapter", None), fmt.Adapter):
        record = adapter.adapter
    elif isinstance(adapter, nn.Module):
        record = to_adapter(adapter)
    else:
        raise TypeError(f"save_adapter: expected a model with UORA injected, a "
                        f"uora_rt.format.Adapter or a training result, got "
                        f"{type(adapter).__name__}")
    fmt.save(record, path)


@torch.no_grad()
def load_adapter(model: nn.Module, path) -> nn.Module:
    """Loads a `.uora` file into `model`: injects UORA first if the model has none, else checks
    that the model's adapter has the same family and targets. Returns the model."""
    adapter = fmt.load(path)
    if adapter.projection.algorithm != ALGORITHM:
        raise AdapterFormatError(path, "__metadata__.projection.algorithm", repr(ALGORITHM),
                                 f"{adapter.projection.algorithm!r} (serve it with uora_rt.load)")
    modules = dict(model.named_modules())
    if find_shared(model) is None:
        for t in adapter.targets:
            dims = linear_dims(modules.get(t)) if t in modules else None
            want = tuple(adapter.base["modules"][t])
            if dims != want:
                raise AdapterFormatError(path, f"__metadata__.base.modules.{t}",
                                         f"a linear {list(want)} in the model",
                                         "absent" if dims is None else list(dims))
        train = adapter.training
        config = UORAConfig(r=adapter.r, target_modules=list(adapter.targets),
                            seed=adapter.projection.seed,
                            **{k: train[k] for k in ("d_initial", "alpha", "tau", "k", "dropout")
                               if k in train})
        inject(model, config, _spec=adapter.projection)
    shared = shared_state(model)
    if shared.spec != adapter.projection:
        raise AdapterFormatError(path, "__metadata__.projection", str(shared.spec),
                                 str(adapter.projection))
    if shared.names != adapter.targets:
        raise AdapterFormatError(path, "__metadata__.targets", shared.names, adapter.targets)
    for name, layer in adapter_layers(model):
        want = (layer.out_features, layer.in_features)
        if tuple(adapter.base["modules"][name]) != want:
            raise AdapterFormatError(path, f"__metadata__.base.modules.{name}", list(want),
                                     adapter.base["modules"][name])
    for name, layer in adapter_layers(model):
        layer.lambda_b.copy_(adapter.lambda_b[name])
        layer.lambda_d.copy_(adapter.lambda_d[name])
    shared.p.copy_(adapter.p)
    shared.events.copy_(adapter.count)
    shared.counts.zero_()
    shared.rebuild()
    return model
