"""`.uora` -> PEFT folders: VeRA with its projections saved, or an exact rank-r LoRA.

Both folders are what `PeftModel.from_pretrained(base_model, folder)` loads: adapter_config.json
(sorted, indented, as PEFT writes it; PEFT fills every field left out with its default) and
adapter_model.safetensors (metadata {"format": "pt"}, keys without the adapter name).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file

from uora_rt.core import format as fmt
from uora_rt.convert.base_model import architecture_conv1d, resolve_base
from uora_rt.convert.matrices import live_projections
from uora_rt.convert.peft_dir import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from uora_rt.errors import AdapterFormatError


@dataclass
class LoraExport:
    """Where a LoRA export went and what it costs against the `.uora` file."""

    folder: Path
    lora_bytes: int    # adapter_model.safetensors
    config_bytes: int  # adapter_config.json
    uora_bytes: int    # the .uora file (serialized now if the adapter was never saved)

    @property
    def ratio(self) -> float:
        return self.lora_bytes / self.uora_bytes

    def summary(self) -> str:
        return (f"LoRA export {self.folder}: {self.lora_bytes:,} bytes of weights "
                f"(+{self.config_bytes:,} config) vs {self.uora_bytes:,} bytes of .uora "
                f"({self.ratio:.1f}x)")


def _as_adapter(adapter) -> fmt.Adapter:
    return adapter if isinstance(adapter, fmt.Adapter) else fmt.load(adapter)


def _layout(adapter: fmt.Adapter, base):
    """(out, in) per target (checked against `base` when given), the Conv1D targets, and the
    base's name for base_model_name_or_path."""
    where = adapter.path or "<adapter>"
    shapes = {t: tuple(adapter.base["modules"][t]) for t in adapter.targets}
    if base is None:
        conv = architecture_conv1d(str(adapter.base.get("architecture", "")), adapter.targets)
        return shapes, conv, None
    found_base = resolve_base(base)
    for t, want in shapes.items():
        key = f"__metadata__.base.modules.{t}"
        found = found_base.shape(t, where, key)
        if tuple(found) != want:
            raise AdapterFormatError(where, key, f"{list(want)} (out, in), the adapter's shape",
                                     f"{list(found)} in the base {found_base.source}: "
                                     "shape mismatch")
    conv = {t for t in adapter.targets if found_base.is_conv1d(t)}
    return shapes, conv, found_base.name_or_path


def _common_config(adapter: fmt.Adapter, conv1d, name_or_path) -> dict:
    return {
        "base_model_name_or_path": name_or_path, "bias": "none",
        # PEFT sets this itself for Conv1D (with a warning); writing it keeps merges right.
        "fan_in_fan_out": bool(conv1d), "inference_mode": True, "layers_pattern": None,
        "layers_to_transform": None, "modules_to_save": None, "revision": None,
        # The full module names, which PEFT matches exactly (a list matches name or suffix).
        "target_modules": list(adapter.targets), "task_type": None,
    }


def _write(out_dir, tensors: dict, config: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()},
              str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    # Config last: a folder without it is not taken for an adapter if we die half-way.
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def to_peft_vera(adapter, out_dir, base=None) -> Path:
    """Writes `adapter` (a `.uora` path or a format.Adapter) as a PEFT VeRA folder whose
    outputs equal ours: the live A/B (UORA: rebuilt from seed and P) saved explicitly,
    sized to the maxima over the targets as PEFT's own _find_dim sizes them."""
    ad = _as_adapter(adapter)
    shapes, conv1d, name_or_path = _layout(ad, base)
    a, b = live_projections(ad)
    max_out = max(s[0] for s in shapes.values())
    max_in = max(s[1] for s in shapes.values())
    tensors = {}
    for t in ad.targets:
        tensors[f"{PREFIX}{t}.vera_lambda_b"] = ad.lambda_b[t]
        tensors[f"{PREFIX}{t}.vera_lambda_d"] = ad.lambda_d[t]
    tensors["base_model.vera_A"] = a[:, :max_in]
    tensors["base_model.vera_B"] = b[:max_out, :]
    train = ad.training
    spec = ad.projection
    config = _common_config(ad, conv1d, name_or_path) | {
        "peft_type": "VERA", "r": spec.r, "save_projection": True, "init_weights": True,
        # Only meaningful for PEFT's own draw; with save_projection it is never used for values.
        "projection_prng_key": spec.seed if spec.algorithm == fmt.PEFT_VERA_ALGORITHM else 0,
        "d_initial": float(train.get("d_initial", 0.1)),
        "vera_dropout": float(train.get("dropout", 0.0)),
    }
    return _write(out_dir, tensors, config)


def to_peft_lora(adapter, out_dir, base=None) -> LoraExport:
    """Writes `adapter` as an exact rank-r PEFT LoRA folder and reports its bytes.

    Per target (out, in): lora_A = lambda_d[:, None] * A[:, :in]  [r, in],
    lora_B = lambda_b[:, None] * B[:out]  [out, r], lora_alpha = r (scaling 1), so that
    lora_B @ lora_A == (lambda_b * B_sl) @ (lambda_d * A_sl), the adapter's delta W.
    """
    ad = _as_adapter(adapter)
    shapes, conv1d, name_or_path = _layout(ad, base)
    a, b = live_projections(ad)
    tensors = {}
    for t in ad.targets:
        out_f, in_f = shapes[t]
        tensors[f"{PREFIX}{t}.lora_A.weight"] = ad.lambda_d[t].float()[:, None] * a[:, :in_f]
        tensors[f"{PREFIX}{t}.lora_B.weight"] = ad.lambda_b[t].float()[:, None] * b[:out_f, :]
    r = ad.projection.r
    config = _common_config(ad, conv1d, name_or_path) | {
        "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False,
        "lora_dropout": float(ad.training.get("dropout", 0.0)), "init_lora_weights": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    out = _write(out_dir, tensors, config)
    return LoraExport(folder=out, lora_bytes=(out / WEIGHTS_NAME).stat().st_size,
                      config_bytes=(out / CONFIG_NAME).stat().st_size,
                      uora_bytes=_uora_bytes(ad))


def _uora_bytes(ad: fmt.Adapter) -> int:
    if ad.path and Path(ad.path).is_file():
        return os.path.getsize(ad.path)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.uora"
        fmt.save(ad, path)
        return path.stat().st_size
