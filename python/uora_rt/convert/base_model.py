"""The base model's adapted-layer shapes, from a Hugging Face folder (headers only, no weights
loaded) or from an nn.Module: what a converter needs for max_in/max_out and the fingerprint."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from uora_rt.models import checkpoint
from uora_rt.errors import AdapterFormatError
from uora_rt.core.targets import conv1d_class, linear_dims


@dataclass
class BaseShapes:
    """Every adaptable linear of a base model: name -> (out, in), plus which are GPT-2 Conv1D."""

    architecture: str
    modules: dict[str, tuple[int, int]]
    conv1d: set[str] = field(default_factory=set)
    source: str = "<model>"
    name_or_path: str | None = None  # for adapter_config.json's base_model_name_or_path

    def resolve(self, name: str, where, key: str) -> str:
        """The base's spelling of an adapter module name (known prefixes added or removed)."""
        try:
            return checkpoint.resolve_module(name, self.modules, where)
        except AdapterFormatError:
            raise AdapterFormatError(where, key, f"a linear module {name!r} in the base "
                                     f"{self.source}", "no such module") from None

    def shape(self, name: str, where, key: str) -> tuple[int, int]:
        return self.modules[self.resolve(name, where, key)]

    def is_conv1d(self, name: str) -> bool:
        return checkpoint.resolve_module(name, self.modules) in self.conv1d


def from_folder(folder) -> BaseShapes:
    folder = Path(folder)
    config = checkpoint.read_config(folder)
    modules = checkpoint.module_shapes(folder, config)
    conv = checkpoint.CONV1D_SUFFIXES.get(config.get("model_type"), ())
    archs = config.get("architectures") or [config.get("model_type") or "unknown"]
    return BaseShapes(architecture=str(archs[0]), modules=modules,
                      conv1d={m for m in modules if conv and m.endswith(conv)},
                      source=str(folder), name_or_path=str(folder))


def from_module(model: nn.Module) -> BaseShapes:
    conv_cls = conv1d_class()
    modules, conv = {}, set()
    for name, module in model.named_modules():
        dims = linear_dims(module)
        if dims is not None and name:
            modules[name] = dims
            if conv_cls is not None and isinstance(module, conv_cls):
                conv.add(name)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return BaseShapes(architecture=type(model).__name__, modules=modules, conv1d=conv,
                      source=f"<{type(model).__name__}>", name_or_path=name_or_path)


def resolve_base(base, hint: str | None = None, hint_source=None, relative_to=None) -> BaseShapes:
    """`base` as given (an HF folder or an nn.Module), else `hint` (adapter_config.json's
    base_model_name_or_path) when that is a local folder. Never touches the network."""
    if isinstance(base, nn.Module):
        return from_module(base)
    if base is not None:
        if not Path(base).is_dir():
            raise FileNotFoundError(f"base {str(base)!r}: not a local folder (pass a Hugging Face "
                                    "model folder with config.json, or an nn.Module)")
        return from_folder(base)
    candidates = []
    if hint:
        candidates.append(Path(hint))
        if relative_to is not None and not Path(hint).is_absolute():
            candidates.append(Path(relative_to) / hint)
    for c in candidates:
        if c.is_dir() and (c / "config.json").is_file():
            return from_folder(c)
    raise ValueError(f"{hint_source}: the base model's layer shapes are needed: pass base= (a "
                     "Hugging Face model folder or an nn.Module; on the command line --base DIR); "
                     f"base_model_name_or_path={hint!r} is not a local model folder (no network "
                     "is used)")


def natural_key(name: str):
    """Sort key that puts layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def architecture_conv1d(architecture: str, names) -> set[str]:
    """Conv1D modules guessed from a stored architecture name (when no base is at hand)."""
    suffixes = checkpoint.CONV1D_SUFFIXES.get("gpt2", ()) if architecture.startswith("GPT2") else ()
    return {n for n in names if suffixes and n.endswith(suffixes)}
