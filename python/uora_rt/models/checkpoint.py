"""Hugging Face checkpoint folders: config, tensor index (headers only) and lazy tensor loading.

A folder holds config.json and either model.safetensors or model.safetensors.index.json with
shards. Nothing here imports transformers or touches the network.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from uora_rt.errors import AdapterFormatError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# GPT-2's Conv1D modules store their weight as [in, out].
CONV1D_SUFFIXES = {"gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8,
              "I8": torch.int8, "BOOL": torch.bool}


class CheckpointError(ValueError):
    """A base checkpoint folder is missing something or is malformed."""


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes: not safetensors")
        raw = f.read(n)
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: unreadable safetensors header") from None


def tensor_index(folder) -> dict[str, tuple[tuple[int, ...], torch.dtype, Path]]:
    """name -> (shape, dtype, file) for every tensor of the checkpoint, from headers only."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (folder / SINGLE).is_file():
        files = [SINGLE]
    else:
        raise CheckpointError(f"{folder}: neither {SINGLE} nor {INDEX} found")
    out = {}
    for name in files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: shard {name} listed in {INDEX} is missing")
        for key, info in _header(path).items():
            if key == "__metadata__":
                continue
            dtype = _ST_DTYPES.get(info.get("dtype"))
            out[key] = (tuple(info["shape"]), dtype, path)
    return out


def module_shapes(folder, config: dict | None = None) -> dict[str, tuple[int, int]]:
    """(out, in) of every 2-D `<module>.weight` in the checkpoint (Conv1D transposed back)."""
    config = config or read_config(folder)
    conv = CONV1D_SUFFIXES.get(config.get("model_type"), ())
    shapes = {}
    for key, (shape, _, _) in tensor_index(folder).items():
        if key.endswith(".weight") and len(shape) == 2:
            module = key[: -len(".weight")]
            shapes[module] = (shape[1], shape[0]) if module.endswith(conv) else tuple(shape)
    return shapes


def load_tensors(folder, names=None, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Loads tensors (all, or `names`) on the CPU, optionally cast to `dtype` (floats only)."""
    index = tensor_index(folder)
    wanted = list(index) if names is None else list(names)
    missing = [n for n in wanted if n not in index]
    if missing:
        raise CheckpointError(f"{folder}: tensors missing from the checkpoint: {missing[:5]}")
    by_file: dict[Path, list[str]] = {}
    for n in wanted:
        by_file.setdefault(index[n][2], []).append(n)
    out = {}
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for k in keys:
                t = f.get_tensor(k)
                out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    return out


def resolve_module(name: str, available, source=None) -> str:
    """Maps an adapter's module name onto the checkpoint's naming: exact, or with a known
    base-model prefix (`bert.`, `model.`, `transformer.`, `roberta.`) added or removed."""
    if name in available:
        return name
    prefixes = ("bert.", "roberta.", "transformer.", "model.", "base_model.model.")
    for p in prefixes:
        if name.startswith(p) and name[len(p):] in available:
            return name[len(p):]
        if p + name in available:
            return p + name
    raise AdapterFormatError(source or "<adapter>", f"targets: {name}",
                             "a linear module of the base model", "no such module")
