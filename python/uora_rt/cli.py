"""The `uora-rt` command (also `python -m uora_rt`)."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="uora-rt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a UORA adapter on the packaged MiniLM and save it")
    demo.add_argument("--out", default="uora-demo", help="output folder (default: ./uora-demo)")
    demo.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from uora_rt.demo import run

        return run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
