"""The `.uora` adapter file (docs/design.md §3): the one schema, its writer and its validating
reader.

A safetensors file. `__metadata__` (all strings, JSON where structured):
    format          "uora"
    format_version  "1"
    projection      {"algorithm", "seed", "r", "max_in", "max_out"}
    targets         ["<module>", ...]          adapted modules, in layer order
    base            {"architecture", "modules": {"<module>": [out, in]}}
    training        {"alpha", "tau", "k", "d_initial", "dropout"}   informational
    head            optional: {"task", "pooling", "hidden", "outputs"} (a task head trained with
                    the adapter: pooling, then a linear layer; absent in adapters without one)
Tensors:
    <module>.lambda_b   float32 [out]
    <module>.lambda_d   float32 [r]
    reinit.p            float32 [r]   in (0, 1]; A[i] = p_i A0[i] + (1 - p_i) QA[i]
    reinit.count        int32   [r]   reinit events per index
    projection.A        float32 [r, max_in]    only for algorithm "explicit"
    projection.B        float32 [max_out, r]   only for algorithm "explicit"
    head.weight         float32 [outputs, hidden]   only with a head
    head.bias           float32 [outputs]           only with a head
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from uora_rt.errors import AdapterFormatError
from uora_rt.core.projections import ALGORITHM as UORA_ALGORITHM
from uora_rt.core.projections import ProjectionSpec

FORMAT = "uora"
FORMAT_VERSION = 1
PEFT_VERA_ALGORITHM = "peft-vera-kaiming-mt19937"
EXPLICIT_ALGORITHM = "explicit"
ALGORITHMS = (UORA_ALGORITHM, PEFT_VERA_ALGORITHM, EXPLICIT_ALGORITHM)
_METADATA_KEYS = ("format", "format_version", "projection", "targets", "base", "training")
_OPTIONAL_KEYS = ("head",)
HEAD_TASKS = ("classification", "regression")
HEAD_POOLINGS = ("mean", "cls", "max")
_HEAD_FIELDS = ("task", "pooling", "hidden", "outputs")
_MAX_HEADER = 100_000_000


@dataclass
class Head:
    """A task head stored beside the adapter: pool the encoder's hidden states, then a linear
    layer. task: "classification" (outputs = classes) or "regression" (outputs = 1)."""

    task: str
    pooling: str
    weight: torch.Tensor  # [outputs, hidden]
    bias: torch.Tensor    # [outputs]

    @property
    def outputs(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1]

    def num_parameters(self) -> int:
        return self.weight.numel() + self.bias.numel()

    def to_dict(self) -> dict:
        return {"task": self.task, "pooling": self.pooling, "hidden": self.hidden,
                "outputs": self.outputs}


@dataclass
class Adapter:
    """An adapter in memory: everything a `.uora` file holds, as CPU tensors."""

    projection: ProjectionSpec
    targets: list[str]
    lambda_b: dict[str, torch.Tensor]
    lambda_d: dict[str, torch.Tensor]
    p: torch.Tensor
    count: torch.Tensor
    base: dict
    training: dict = field(default_factory=dict)
    explicit: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, B) for EXPLICIT_ALGORITHM
    path: str | None = None
    head: Head | None = None

    @property
    def r(self) -> int:
        return self.projection.r

    @property
    def has_reinit(self) -> bool:
        return bool((self.p < 1).any())

    def base_fingerprint(self) -> str:
        """A short hash of the adapted modules' names and shapes."""
        return fingerprint(self.base.get("modules", {}))

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.lambda_b.values()) + sum(
            t.numel() for t in self.lambda_d.values())


def fingerprint(modules: dict) -> str:
    canon = json.dumps({k: list(v) for k, v in sorted(modules.items())}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- writer


def save(adapter: Adapter, path) -> None:
    """Writes `adapter` to `path` atomically (a crash never leaves a truncated file behind)."""
    tensors = {}
    for name in adapter.targets:
        tensors[f"{name}.lambda_b"] = adapter.lambda_b[name].detach().float().cpu().contiguous()
        tensors[f"{name}.lambda_d"] = adapter.lambda_d[name].detach().float().cpu().contiguous()
    tensors["reinit.p"] = adapter.p.detach().float().cpu().contiguous()
    tensors["reinit.count"] = adapter.count.detach().to(torch.int32).cpu().contiguous()
    if adapter.explicit is not None:
        tensors["projection.A"] = adapter.explicit[0].detach().float().cpu().contiguous()
        tensors["projection.B"] = adapter.explicit[1].detach().float().cpu().contiguous()
    if adapter.head is not None:
        tensors["head.weight"] = adapter.head.weight.detach().float().cpu().contiguous()
        tensors["head.bias"] = adapter.head.bias.detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "projection": json.dumps(adapter.projection.to_dict()),
        "targets": json.dumps(list(adapter.targets)),
        "base": json.dumps(adapter.base),
        "training": json.dumps(adapter.training),
    }
    if adapter.head is not None:  # absent otherwise: files without a head keep their bytes
        metadata["head"] = json.dumps(adapter.head.to_dict())
    data = _canonical(st_save(tensors, metadata=metadata))
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; an adapter gets the permissions a plain open() gives it.
        # (Reading the umask sets it briefly: to 0o077, so a racing thread's file is never wider.)
        umask = os.umask(0o077)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _canonical(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in one fixed order (metadata keys sorted,
    tensors by offset): safetensors writes the metadata map in a random order on every call, so
    without this the same adapter would never save to the same bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {} if meta is None else {"__metadata__": dict(sorted(meta.items()))}
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


# ------------------------------------------------------------------------------------- reader


def load(path) -> Adapter:
    """Reads and validates a `.uora` file; every defect raises AdapterFormatError."""
    path = str(path)
    with open(path, "rb") as f:
        data = f.read()
    return loads(data, path)


def loads(data: bytes, path: str) -> Adapter:
    """load() of a file's bytes (tensor-parallel workers receive them); path names it in errors."""
    header = _read_header(path, data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        raise AdapterFormatError(path, "__metadata__", "a metadata map with format='uora'", "none")
    _check_metadata(path, meta)
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors' own validation: offsets, sizes, dtypes
        raise AdapterFormatError(path, "<tensors>", "valid safetensors data", f"{e}") from None
    return _build(path, meta, tensors)


def _read_header(path: str, data: bytes) -> dict:
    if len(data) < 8:
        raise AdapterFormatError(path, "<header>", "a safetensors file (8-byte header length)",
                                 f"{len(data)} bytes: truncated or empty")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER or 8 + n > len(data):
        raise AdapterFormatError(path, "<header>", f"a JSON header of {n} bytes within the file",
                                 f"a file of {len(data)} bytes: truncated or not safetensors")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(path, "<header>", "a UTF-8 JSON safetensors header",
                                 f"unparseable bytes ({e.__class__.__name__}): "
                                 "not safetensors") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(path, "<header>", "a JSON object", type(header).__name__)
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise AdapterFormatError(path, "<header>", "tensor entries with data_offsets",
                                 "malformed entries: not safetensors") from None
    if 8 + n + end != len(data):
        raise AdapterFormatError(path, "<data>", f"{8 + n + end} bytes (header + tensor data)",
                                 f"{len(data)} bytes: truncated or padded")
    return header


def _json_field(path, meta, key, kind):
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, TypeError):
        raise AdapterFormatError(path, f"__metadata__.{key}", f"a JSON {kind.__name__}",
                                 repr(meta[key])[:80]) from None
    if not isinstance(value, kind):
        raise AdapterFormatError(path, f"__metadata__.{key}", f"a JSON {kind.__name__}",
                                 type(value).__name__)
    return value


def _check_metadata(path: str, meta: dict) -> None:
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(path, "__metadata__.format", repr(FORMAT),
                                 repr(meta.get("format")))
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise AdapterFormatError(path, "__metadata__.format_version",
                                 f"a known version ({FORMAT_VERSION})", repr(version))
    for key in _METADATA_KEYS:
        if key not in meta:
            raise AdapterFormatError(path, f"__metadata__.{key}", "present", "missing")
    extra = sorted(set(meta) - set(_METADATA_KEYS) - set(_OPTIONAL_KEYS))
    if extra:
        raise AdapterFormatError(path, f"__metadata__.{extra[0]}",
                                 f"only {list(_METADATA_KEYS + _OPTIONAL_KEYS)}", "an unknown key")


def _projection(path: str, meta: dict) -> ProjectionSpec:
    proj = _json_field(path, meta, "projection", dict)
    fields = ("algorithm", "seed", "r", "max_in", "max_out")
    if set(proj) != set(fields):
        raise AdapterFormatError(path, "__metadata__.projection", f"exactly the fields {fields}",
                                 sorted(proj))
    if proj["algorithm"] not in ALGORITHMS:
        raise AdapterFormatError(path, "__metadata__.projection.algorithm", f"one of {ALGORITHMS}",
                                 repr(proj["algorithm"]))
    for key in fields[1:]:
        v = proj[key]
        lo = 0 if key == "seed" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise AdapterFormatError(path, f"__metadata__.projection.{key}", f"an int >= {lo}",
                                     repr(v))
    if proj["r"] > min(proj["max_in"], proj["max_out"]):
        raise AdapterFormatError(path, "__metadata__.projection.r", "r <= min(max_in, max_out)",
                                 f"r={proj['r']}, max_in={proj['max_in']}, "
                                 f"max_out={proj['max_out']}")
    return ProjectionSpec(**proj)


def _head_spec(path: str, meta: dict) -> dict | None:
    if "head" not in meta:
        return None
    head = _json_field(path, meta, "head", dict)
    if set(head) != set(_HEAD_FIELDS):
        raise AdapterFormatError(path, "__metadata__.head", f"exactly the fields {_HEAD_FIELDS}",
                                 sorted(head))
    if head["task"] not in HEAD_TASKS:
        raise AdapterFormatError(path, "__metadata__.head.task", f"one of {HEAD_TASKS}",
                                 repr(head["task"]))
    if head["pooling"] not in HEAD_POOLINGS:
        raise AdapterFormatError(path, "__metadata__.head.pooling", f"one of {HEAD_POOLINGS}",
                                 repr(head["pooling"]))
    for key in ("hidden", "outputs"):
        v = head[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise AdapterFormatError(path, f"__metadata__.head.{key}", "an int >= 1", repr(v))
    if head["task"] == "regression" and head["outputs"] != 1:
        raise AdapterFormatError(path, "__metadata__.head.outputs", "1 for a regression head",
                                 head["outputs"])
    if head["task"] == "classification" and head["outputs"] < 2:
        raise AdapterFormatError(path, "__metadata__.head.outputs",
                                 ">= 2 classes for a classification head", head["outputs"])
    return head


def _build(path: str, meta: dict, tensors: dict) -> Adapter:
    spec = _projection(path, meta)
    targets = _json_field(path, meta, "targets", list)
    base = _json_field(path, meta, "base", dict)
    training = _json_field(path, meta, "training", dict)
    if (not targets or not all(isinstance(t, str) and t for t in targets)
            or len(set(targets)) != len(targets)):
        raise AdapterFormatError(path, "__metadata__.targets", "a non-empty list of unique names",
                                 repr(targets)[:120])
    modules = base.get("modules")
    if not isinstance(modules, dict):
        raise AdapterFormatError(path, "__metadata__.base.modules", "a map of module -> [out, in]",
                                 repr(modules)[:80])
    r = spec.r
    shapes = {}
    for t in targets:
        shape = modules.get(t)
        if (not isinstance(shape, list) or len(shape) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                           for v in shape)):
            raise AdapterFormatError(path, f"__metadata__.base.modules.{t}", "[out, in]",
                                     repr(shape))
        out_f, in_f = shape
        if out_f > spec.max_out or in_f > spec.max_in:
            raise AdapterFormatError(path, f"__metadata__.base.modules.{t}",
                                     f"out <= max_out={spec.max_out} and "
                                     f"in <= max_in={spec.max_in}",
                                     shape)
        shapes[f"{t}.lambda_b"] = ((out_f,), torch.float32)
        shapes[f"{t}.lambda_d"] = ((r,), torch.float32)
    shapes["reinit.p"] = ((r,), torch.float32)
    shapes["reinit.count"] = ((r,), torch.int32)
    if spec.algorithm == EXPLICIT_ALGORITHM:
        shapes["projection.A"] = ((r, spec.max_in), torch.float32)
        shapes["projection.B"] = ((spec.max_out, r), torch.float32)
    head = _head_spec(path, meta)
    if head is not None:
        shapes["head.weight"] = ((head["outputs"], head["hidden"]), torch.float32)
        shapes["head.bias"] = ((head["outputs"],), torch.float32)
    for key in sorted(shapes):
        if key not in tensors:
            raise AdapterFormatError(path, key, f"a tensor {list(shapes[key][0])}", "missing")
    for key in sorted(tensors):
        if key not in shapes:
            if key.startswith("head.") and head is None:
                raise AdapterFormatError(path, key, "a head described in __metadata__.head",
                                         "head tensors without that description")
            raise AdapterFormatError(path, key, f"only the keys of {len(targets)} targets",
                                     "an unexpected tensor")
    for key, (shape, dtype) in shapes.items():
        t = tensors[key]
        if t.dtype != dtype:
            raise AdapterFormatError(path, key, f"dtype {dtype}", f"{t.dtype}")
        if tuple(t.shape) != shape:
            what = "r mismatch: " if key.endswith("lambda_d") or key.startswith("reinit.") else ""
            raise AdapterFormatError(path, key, f"shape {list(shape)}", f"{what}{list(t.shape)}")
    floats = [k for k, (_, dt) in shapes.items() if dt.is_floating_point]
    # One pass over every float value (a file holds hundreds of small tensors); only a failing
    # file pays for finding which key holds the NaN or Inf.
    if not bool(torch.isfinite(torch.cat([tensors[k].reshape(-1) for k in floats])).all()):
        bad = next(k for k in floats if not bool(torch.isfinite(tensors[k]).all()))
        raise AdapterFormatError(path, bad, "finite values", "NaN or Inf")
    p, count = tensors["reinit.p"], tensors["reinit.count"]
    if not bool(((p > 0) & (p <= 1)).all()):
        raise AdapterFormatError(path, "reinit.p", "values in (0, 1]",
                                 f"min {float(p.min()):g}, max {float(p.max()):g}")
    if spec.algorithm != UORA_ALGORITHM and bool((p != 1).any()):
        raise AdapterFormatError(path, "reinit.p", f"all 1 for algorithm {spec.algorithm!r} "
                                 "(it has no reinit targets)", f"min {float(p.min()):g}")
    if bool((count < 0).any()):
        raise AdapterFormatError(path, "reinit.count", "values >= 0", f"min {int(count.min())}")
    explicit = None
    if spec.algorithm == EXPLICIT_ALGORITHM:
        explicit = (tensors["projection.A"], tensors["projection.B"])
    return Adapter(
        projection=spec, targets=list(targets),
        lambda_b={t: tensors[f"{t}.lambda_b"] for t in targets},
        lambda_d={t: tensors[f"{t}.lambda_d"] for t in targets},
        p=p, count=count, base=base, training=training, explicit=explicit, path=path,
        head=None if head is None else Head(head["task"], head["pooling"],
                                            tensors["head.weight"], tensors["head.bias"]))
