"""`uora-rt convert SRC DST --to uora|peft-vera|peft-lora [--base DIR]`.

SRC is a PEFT adapter folder, a `.uora` file, or a folder of those (converted one by one with a
progress bar; a bad adapter is reported and skipped, the others still convert).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("uora", "peft-vera", "peft-lora")


def add_arguments(parser) -> None:
    parser.add_argument("src", help="a PEFT adapter folder, a .uora file, or a folder of them")
    parser.add_argument("dst", help="output: a .uora path or a PEFT folder; a folder for a batch")
    parser.add_argument("--to", required=True, choices=TARGETS, help="output format")
    parser.add_argument("--base", default=None,
                        help="local Hugging Face base model folder (needed to read PEFT adapters "
                             "unless their base_model_name_or_path is a local folder; checked "
                             "against .uora files when given)")


@dataclass
class Outcome:
    name: str
    ok: bool
    detail: str  # the output path, or why it was skipped
    failed: bool = False  # an adapter that could not be converted (not merely "not an adapter")


def _kind(path: Path) -> str | None:
    from uora_rt.convert.peft_dir import is_peft_folder

    if path.is_file() and path.suffix == ".uora":
        return "uora"
    if path.is_dir() and is_peft_folder(path):
        return "peft"
    return None


def convert_one(src: Path, dst: Path, to: str, base) -> str:
    """Converts one adapter; returns a line saying what was written."""
    from uora_rt.convert import from_peft, to_peft_lora, to_peft_vera

    kind = _kind(src)
    if kind is None:
        raise ValueError(f"{src}: not an adapter (neither a .uora file nor a folder with "
                         "adapter_config.json)")
    if kind == "uora" and to == "uora":
        raise ValueError(f"{src}: already a .uora file")
    if to == "uora":
        from_peft(src, dst, base=base)
        return str(dst)
    adapter = from_peft(src, None, base=base) if kind == "peft" else src
    if to == "peft-vera":
        to_peft_vera(adapter, dst, base=base)
        return str(dst)
    return to_peft_lora(adapter, dst, base=base).summary()


def _dst_for(src: Path, dst_dir: Path, to: str) -> Path:
    stem = src.stem if src.is_file() else src.name
    return dst_dir / (f"{stem}.uora" if to == "uora" else stem)


def run(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        print(f"error: {src}: no such file or folder", file=sys.stderr)
        return 1
    if _kind(src) is not None:  # one adapter
        if args.to == "uora" and dst.is_dir():
            dst = _dst_for(src, dst, "uora")
        try:
            print(f"converted {src} -> {convert_one(src, dst, args.to, args.base)}")
        except Exception as e:  # noqa: BLE001 - one clear line instead of a traceback
            print(f"error: {_reason(e)}", file=sys.stderr)
            return 1
        return 0
    if not src.is_dir():
        print(f"error: {src}: not an adapter (a .uora file, a PEFT folder or a folder of them)",
              file=sys.stderr)
        return 1
    return _run_batch(src, dst, args.to, args.base)


def _reason(e: Exception) -> str:
    # ValueError subclasses (AdapterFormatError, CheckpointError) carry complete messages.
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def _run_batch(src: Path, dst: Path, to: str, base) -> int:
    from tqdm import tqdm

    entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
    dst.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for entry in tqdm(entries, desc="convert", unit="adapter", file=sys.stderr):
        if _kind(entry) is None:
            outcomes.append(Outcome(entry.name, False, "not an adapter"))
            continue
        if _kind(entry) == "uora" and to == "uora":
            outcomes.append(Outcome(entry.name, False, "already a .uora file"))
            continue
        try:
            detail = convert_one(entry, _dst_for(entry, dst, to), to, base)
            outcomes.append(Outcome(entry.name, True, detail))
        except Exception as e:  # noqa: BLE001 - report it and go on with the next adapter
            outcomes.append(Outcome(entry.name, False, _reason(e), failed=True))
    done = [o for o in outcomes if o.ok]
    skipped = [o for o in outcomes if not o.ok]
    print(f"converted {len(done)}, skipped {len(skipped)} "
          f"({sum(o.failed for o in skipped)} failed)")
    for o in done:
        print(f"  converted {o.name}: {o.detail}")
    for o in skipped:
        print(f"  skipped   {o.name}: {o.detail}")
    return 1 if any(o.failed for o in skipped) else 0
