"""`uora-rt inspect FILE [--json]`: what a `.uora` file holds."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("file", help="a .uora adapter file")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def describe(path) -> dict:
    """Everything `inspect` reports, as plain values (validates the file first)."""
    from uora_rt.core import format as fmt

    path = Path(path)
    adapter = fmt.load(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    p, count = adapter.p.double(), adapter.count
    reinit = p < 1
    modules = adapter.base.get("modules", {})
    explicit_bytes = sum(t.numel() * 4 for t in adapter.explicit) if adapter.explicit else 0
    return {
        "file": str(path),
        "bytes": {"total": size, "header": 8 + header, "tensors": size - 8 - header,
                  "explicit_projections": explicit_bytes},
        "projection": adapter.projection.to_dict(),
        "targets": {t: list(modules[t]) for t in adapter.targets},
        "parameters": {
            "total": adapter.num_parameters(),
            "lambda_b": sum(t.numel() for t in adapter.lambda_b.values()),
            "lambda_d": sum(t.numel() for t in adapter.lambda_d.values()),
        },
        "p": {"min": float(p.min()), "mean": float(p.mean()), "max": float(p.max()),
              "reinitialized_indices": int(reinit.sum()), "r": adapter.r,
              "events": int(count.sum())},
        "base": {"architecture": adapter.base.get("architecture"),
                 "fingerprint": fmt.fingerprint(modules), "modules": len(modules)},
        "training": adapter.training,
        "head": None if adapter.head is None else {
            **adapter.head.to_dict(), "parameters": adapter.head.num_parameters(),
            "tensors": {"head.weight": list(adapter.head.weight.shape),
                        "head.bias": list(adapter.head.bias.shape)}},
    }


def _print(d: dict) -> None:
    b, proj, par, p, base = d["bytes"], d["projection"], d["parameters"], d["p"], d["base"]
    extra = (f", explicit projections {b['explicit_projections']:,}"
             if b["explicit_projections"] else "")
    print(f"file         {d['file']}")
    print(f"bytes        {b['total']:,} (header {b['header']:,}, tensors {b['tensors']:,}{extra})")
    print(f"projection   {proj['algorithm']}  seed {proj['seed']}  r {proj['r']}  "
          f"max_in {proj['max_in']}  max_out {proj['max_out']}")
    print(f"base         {base['architecture']}  fingerprint {base['fingerprint']}  "
          f"({base['modules']} modules)")
    print(f"parameters   {par['total']:,} (lambda_b {par['lambda_b']:,}, "
          f"lambda_d {par['lambda_d']:,})")
    if p["reinitialized_indices"]:
        print(f"P            min {p['min']:.6g}  mean {p['mean']:.6g}  max {p['max']:.6g}  "
              f"{p['reinitialized_indices']} of {p['r']} indices reinitialized, "
              f"{p['events']} events")
    else:
        print(f"P            all 1 (no reinitialization, {p['events']} events)")
    print(f"training     {json.dumps(d['training'], sort_keys=True)}")
    head = d["head"]
    if head is None:
        print("head         none")
    else:
        print(f"head         {head['task']}, {head['pooling']} pooling, {head['outputs']} "
              f"output(s) from {head['hidden']} features, {head['parameters']:,} parameters")
        for name, shape in head["tensors"].items():
            print(f"  {name:<12}  {shape}")
    print(f"targets      {len(d['targets'])}")
    width = max(len(t) for t in d["targets"])
    for t, (out_f, in_f) in d["targets"].items():
        print(f"  {t:<{width}}  out {out_f}  in {in_f}")


def run(args) -> int:
    from uora_rt.convert.peft_dir import is_peft_folder

    path = Path(args.file)
    if path.is_dir() and is_peft_folder(path):
        print(f"error: {path} is a PEFT adapter folder; convert it first: "
              f"uora-rt convert {path} OUT.uora --to uora --base BASE_DIR", file=sys.stderr)
        return 1
    try:
        d = describe(path)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print(d)
    return 0
