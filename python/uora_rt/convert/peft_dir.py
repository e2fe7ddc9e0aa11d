"""Reading a PEFT VeRA adapter folder (adapter_config.json + adapter_model.safetensors), strictly.

Also reads the UORA authors' checkpoints (their PEFT fork): peft_type "UORA" with keys
`<module>.uora_lambda_{b,d}` and projections `base_model.uora_{A,B}`, and VeRA checkpoints whose
saved vera_A/vera_B were modified by reinitialization. Every defect raises AdapterFormatError
naming the file, the key, what was expected and what was found. No pickle: a folder that holds
only adapter_model.bin is refused.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load

from uora_rt.core import format as fmt
from uora_rt.errors import AdapterFormatError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# peft_type -> the tuner's key prefix (PEFT VeRA; the UORA authors' fork registers "uora_lambda_").
KINDS = {"VERA": "vera", "UORA": "uora"}
_LAMBDA = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<kind>vera|uora)_lambda_(?P<v>[bd])$")
_PROJ = re.compile(r"^base_model\.(?P<kind>vera|uora)_(?P<m>[AB])$")


@dataclass
class PeftAdapter:
    """A PEFT VeRA-family adapter as read from disk (float32 CPU tensors)."""

    folder: Path
    config: dict
    peft_type: str
    r: int
    seed: int
    lambda_b: dict[str, torch.Tensor]   # module -> [out]
    lambda_d: dict[str, torch.Tensor]   # module -> [r]
    projections: tuple[torch.Tensor, torch.Tensor] | None  # (A [r, >=max_in], B [>=max_out, r])

    @property
    def config_path(self) -> Path:
        return self.folder / CONFIG_NAME

    @property
    def weights_path(self) -> Path:
        return self.folder / WEIGHTS_NAME

    @property
    def modules(self) -> list[str]:
        return list(self.lambda_b)


def is_peft_folder(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        raise AdapterFormatError(folder, "<folder>", "a PEFT adapter folder", "no such directory")
    if not path.is_file():
        raise AdapterFormatError(path, "<file>", f"a PEFT {CONFIG_NAME}", "no such file")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(path, "<json>", "a JSON object", f"unparseable ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFormatError(path, "<json>", "a JSON object", type(config).__name__)
    return config


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file with the same header checks as `.uora` files, then safetensors' own."""
    if not path.is_file():
        pickle = path.with_name(PICKLE_NAME)
        found = (f"only {PICKLE_NAME} (pickle is never loaded: re-save with "
                 "safe_serialization=True)") if pickle.is_file() else "no such file"
        raise AdapterFormatError(path, "<file>", f"the adapter weights {WEIGHTS_NAME}", found)
    data = path.read_bytes()
    fmt._read_header(str(path), data)  # truncation / not-safetensors, with the .uora messages
    try:
        return st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors: offsets, dtypes, sizes
        raise AdapterFormatError(path, "<tensors>", "valid safetensors data", f"{e}") from None


def _int_field(path, config, key, lo=None, default=None):
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo):
        raise AdapterFormatError(path, key, "an int" + (f" >= {lo}" if lo is not None else ""),
                                 repr(value))
    return value


def _float32(path, key, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        raise AdapterFormatError(path, key, "a floating-point tensor", f"dtype {t.dtype}")
    t = t.float()  # fp16/bf16 lambdas (autocast_adapter_dtype=False) upcast exactly
    if not bool(torch.isfinite(t).all()):
        raise AdapterFormatError(path, key, "finite values", "NaN or Inf")
    return t.contiguous()


def read_peft_adapter(folder) -> PeftAdapter:
    """Reads and validates a PEFT VeRA (or UORA-authors) adapter folder."""
    folder = Path(folder)
    config = read_config(folder)
    cpath = folder / CONFIG_NAME
    peft_type = config.get("peft_type")
    if peft_type not in KINDS:
        raise AdapterFormatError(cpath, "peft_type", "'VERA' (or the UORA authors' 'UORA')",
                                 repr(peft_type))
    r = _int_field(cpath, config, "r", lo=1)
    seed = _int_field(cpath, config, "projection_prng_key", default=0)
    wpath = folder / WEIGHTS_NAME
    tensors = read_tensors(wpath)
    kind = KINDS[peft_type]
    lam = {"b": {}, "d": {}}
    proj = {}
    for key in sorted(tensors):
        m = _LAMBDA.match(key)
        if m and m["kind"] == kind:
            lam[m["v"]][m["module"]] = _float32(wpath, key, tensors[key])
            continue
        m = _PROJ.match(key)
        if m:  # either spelling: the authors' VeRA-based branch saves vera_A/B for UORA too
            if m["m"] in proj:
                raise AdapterFormatError(wpath, key, f"one {m['m']} projection",
                                         "both base_model.vera_* and base_model.uora_*")
            proj[m["m"]] = _float32(wpath, key, tensors[key])
            continue
        raise AdapterFormatError(
            wpath, key, f"only {kind}_lambda_b/d and projection tensors",
            "an extra tensor (bias != 'none', modules_to_save or another adapter's keys: not "
            "representable in a .uora file)")
    for a, b in (("b", "d"), ("d", "b")):
        for module in sorted(set(lam[a]) - set(lam[b])):
            raise AdapterFormatError(wpath, f"{PREFIX}{module}.{kind}_lambda_{b}",
                                     f"present (its {kind}_lambda_{a} is)", "missing")
    if not lam["b"]:
        raise AdapterFormatError(wpath, f"{PREFIX}<module>.{kind}_lambda_b",
                                 f"at least one adapted module for peft_type {peft_type}", "none")
    for module, t in lam["d"].items():
        if tuple(t.shape) != (r,):
            raise AdapterFormatError(wpath, f"{PREFIX}{module}.{kind}_lambda_d",
                                     f"shape [{r}] (r in {CONFIG_NAME})", list(t.shape))
    for module, t in lam["b"].items():
        if t.dim() != 1:
            raise AdapterFormatError(wpath, f"{PREFIX}{module}.{kind}_lambda_b", "shape [out]",
                                     list(t.shape))
    projections = _projections(wpath, config, peft_type, r, proj)
    return PeftAdapter(folder=folder, config=config, peft_type=peft_type, r=r, seed=seed,
                       lambda_b=lam["b"], lambda_d=lam["d"], projections=projections)


def _projections(wpath, config, peft_type, r, proj):
    kind = KINDS[peft_type]
    if not proj:
        if peft_type == "UORA":
            # The authors' UORA tuner drops A/B on save even with save_projection=True, and its
            # A/B (torch orthogonal/SVD init, then reinit edits) cannot be rebuilt from the key.
            raise AdapterFormatError(wpath, "base_model.uora_A",
                                     "saved projections (a UORA-authors checkpoint cannot be "
                                     "rebuilt from projection_prng_key)",
                                     "missing: re-save the adapter with uora_A/uora_B")
        if config.get("save_projection", True) is not False:
            raise AdapterFormatError(wpath, "base_model.vera_A",
                                     "present (adapter_config.json has save_projection=true)",
                                     "missing: the file is incomplete")
        return None
    for name in "AB":
        if name not in proj:
            raise AdapterFormatError(wpath, f"base_model.{kind}_{name}",
                                     "present (the other projection is)", "missing")
    a, b = proj["A"], proj["B"]
    if a.dim() != 2 or a.shape[0] != r:
        raise AdapterFormatError(wpath, f"base_model.{kind}_A", f"shape [r={r}, max_in]",
                                 list(a.shape))
    if b.dim() != 2 or b.shape[1] != r:
        raise AdapterFormatError(wpath, f"base_model.{kind}_B", f"shape [max_out, r={r}]",
                                 list(b.shape))
    return a, b
