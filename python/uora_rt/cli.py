"""The `uora-rt` command (also `python -m uora_rt`)."""

from __future__ import annotations

import argparse
import sys

from uora_rt.commands import convert as convert_cmd
from uora_rt.commands import eval as eval_cmd
from uora_rt.commands import inspect as inspect_cmd
from uora_rt.commands import train as train_cmd


def main(argv=None) -> int:
    try:
        return _dispatch(argv)
    except BrokenPipeError:  # `uora-rt inspect FILE | head`: the reader left, nothing went wrong
        sys.stderr.close()
        return 0


def _dispatch(argv) -> int:
    parser = argparse.ArgumentParser(prog="uora-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train UORA adapters on the packaged SmolLM2 and serve "
                                       "them in one mixed batch")
    demo.add_argument("--max-new-tokens", type=int, default=32)
    convert_cmd.add_arguments(sub.add_parser(
        "convert", help="convert adapters: PEFT VeRA -> .uora, .uora -> PEFT VeRA or LoRA"))
    inspect_cmd.add_arguments(sub.add_parser("inspect", help="describe a .uora adapter file"))
    train_cmd.add_arguments(sub.add_parser(
        "train", help="train a UORA adapter (and an encoder's task head) from a JSONL file"))
    eval_cmd.add_arguments(sub.add_parser(
        "eval", help="evaluate an adapter on a JSONL file; prints one JSON object"))
    from uora_rt.commands import serve as serve_cmd  # argparse only: fastapi loads on `serve`

    serve_cmd.add_arguments(sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server; `model` names the adapter"))
    args = parser.parse_args(argv)
    if args.command == "demo":
        from uora_rt.commands.demo import run

        return run(args)
    if args.command == "convert":
        return convert_cmd.run(args)
    if args.command == "inspect":
        return inspect_cmd.run(args)
    if args.command == "train":
        return train_cmd.run(args)
    if args.command == "eval":
        return eval_cmd.run(args)
    if args.command == "serve":
        return serve_cmd.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
