"""PEFT VeRA (or UORA-authors) adapter folder -> `.uora` file."""

from __future__ import annotations

import torch

from uora_rt.core import format as fmt
from uora_rt.convert.base_model import natural_key, resolve_base
from uora_rt.convert.peft_dir import PREFIX, read_peft_adapter
from uora_rt.errors import AdapterFormatError
from uora_rt.core.projections import ProjectionSpec

_MAX_SEED = 2**63 - 1


def from_peft(peft_dir, out_path=None, base=None) -> fmt.Adapter:
    """Converts a PEFT VeRA adapter folder into a `.uora` adapter (written to `out_path` if given).

    Saved `vera_A`/`vera_B` (or the UORA authors' `uora_A`/`uora_B`, possibly modified by their
    reinitialization) are stored as the explicit algorithm. Without them, the adapter refers to
    PEFT's own draw (`peft-vera-kaiming-mt19937`), which uora_rt regenerates bit for bit; its
    max_in/max_out are the maxima over the adapted layers of the base, as PEFT computes them.

    base: a Hugging Face model folder (only headers are read) or an nn.Module; None tries
    adapter_config.json's base_model_name_or_path when it is a local folder.
    Returns the Adapter (as `format.load` would read it back).
    """
    src = read_peft_adapter(peft_dir)
    shapes = resolve_base(base, src.config.get("base_model_name_or_path"), src.config_path,
                          relative_to=src.folder)
    targets = _ordered_targets(src.modules)
    modules = {}
    kind = "uora" if src.peft_type == "UORA" else "vera"
    for t in targets:
        key = f"{PREFIX}{t}.{kind}_lambda_b"
        out_f, in_f = shapes.shape(t, src.weights_path, key)
        found = src.lambda_b[t].shape[0]
        if found != out_f:
            raise AdapterFormatError(src.weights_path, key,
                                     f"shape [{out_f}] (out_features of {t} in the base "
                                     f"{shapes.source})", f"[{found}]: shape mismatch")
        modules[t] = [out_f, in_f]
    max_out = max(s[0] for s in modules.values())
    max_in = max(s[1] for s in modules.values())
    explicit = None
    if src.projections is not None:
        a, b = src.projections
        _check_covers(src, "A", a.shape[1], max_in, "max_in")
        _check_covers(src, "B", b.shape[0], max_out, "max_out")
        # Saved matrices are authoritative: keep them whole (PEFT sizes them to these maxima).
        spec = ProjectionSpec(fmt.EXPLICIT_ALGORITHM, 0, src.r, a.shape[1], b.shape[0])
        explicit = (a, b)
    else:
        seed = src.seed if 0 <= src.seed <= _MAX_SEED else src.seed & 0xFFFFFFFF  # same draw
        spec = ProjectionSpec(fmt.PEFT_VERA_ALGORITHM, seed, src.r, max_in, max_out)
    if spec.r > min(spec.max_in, spec.max_out):
        raise AdapterFormatError(src.config_path, "r", f"r <= min(max_in, max_out) = "
                                 f"min({spec.max_in}, {spec.max_out}) (a .uora file requires it)",
                                 spec.r)
    r = src.r
    adapter = fmt.Adapter(
        projection=spec, targets=targets,
        lambda_b={t: src.lambda_b[t] for t in targets},
        lambda_d={t: src.lambda_d[t] for t in targets},
        p=torch.ones(r), count=torch.zeros(r, dtype=torch.int32),
        base={"architecture": shapes.architecture, "modules": modules},
        training=_training_record(src), explicit=explicit)
    if out_path is not None:
        fmt.save(adapter, out_path)
        adapter.path = str(out_path)
    return adapter


def _ordered_targets(names) -> list[str]:
    """Adapter modules in layer order (layers.2 before layers.10), whatever the file's order."""
    return sorted(names, key=natural_key)


def _check_covers(src, which, size, needed, what):
    kind = "uora" if src.peft_type == "UORA" else "vera"
    if size < needed:
        shape = "[r, max_in]" if which == "A" else "[max_out, r]"
        raise AdapterFormatError(src.weights_path, f"base_model.{kind}_{which}",
                                 f"{shape} with {what} >= {needed} (the largest adapted layer of "
                                 "the base)", f"{what} = {size}: shape mismatch")


def _training_record(src) -> dict:
    cfg = src.config
    record = {"source": f"peft {src.peft_type}", "peft_version": cfg.get("peft_version"),
              "projection_prng_key": src.seed}
    dropout = f"{src.peft_type.lower()}_dropout"
    for ours, theirs in (("d_initial", "d_initial"), ("dropout", dropout),
                         ("alpha", "alpha"), ("tau", "tau"), ("k", "count_k")):
        if isinstance(cfg.get(theirs), (int, float)) and not isinstance(cfg.get(theirs), bool):
            record[ours] = cfg[theirs]
    return {k: v for k, v in record.items() if v is not None}
