"""`uora-rt eval BASE --adapter OUT.uora --data TEST.jsonl`: one JSON object of metrics."""

from __future__ import annotations

import json
import sys


def add_arguments(p) -> None:
    p.add_argument("base", nargs="?", default="smollm2",
                   help="the base the adapter was trained on (folder, 'smollm2' or 'minilm')")
    p.add_argument("--adapter", required=True, help="a .uora file (with its head for encoders)")
    p.add_argument("--data", required=True, help="rows in the training file's format")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")


def run(args) -> int:
    from uora_rt.errors import AdapterFormatError
    from uora_rt.training.data import DataError
    from uora_rt.training.pipeline import evaluate

    try:
        if args.max_len < 1 or args.batch_size < 1:
            raise ValueError("--max-len and --batch-size must be >= 1")
        result = evaluate(args.base, args.adapter, args.data, args.max_len, args.batch_size,
                          args.device, args.dtype, log=lambda m: print(m, file=sys.stderr))
    except (DataError, AdapterFormatError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0
