"""The baseline the engine replaced: `rt.generate` as of commit ecd107b (one batch, left-padded,
one max_new_tokens for all), replaying an offline trace. It needs the old package, which cannot
share a process with the new one (both register the `uora` op library), so bench_engine.py runs
this file with another interpreter:

  git worktree add /work/legacy ecd107b
  python3 -m venv /work/legacy-venv && /work/legacy-venv/bin/pip install torch==2.13.0 \
      scikit-build-core pybind11 ninja safetensors numpy tqdm tokenizers jinja2 gguf
  (cd /work/legacy && /work/legacy-venv/bin/pip install --no-build-isolation --no-deps .)
  /work/legacy-venv/bin/python bench/legacy_static.py --model FOLDER --trace T.json --out R.json \
      [--adapter NAME=FILE ...]

All requests (or each --batch of them, in arrival order) go into one generate call with
max_new_tokens = the longest output (what a static batch must do); each request counts only its
own max_tokens. On a GPU: --random-config CONFIG.json --device cuda --dtype bfloat16. The call
returns nothing until it
ends, so every request's first token and finish are the call's end, as its caller sees them.
End-of-sequence tokens are disabled so outputs have the trace's lengths, as ignore_eos does
elsewhere.
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_trace import result  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--batch", type=int, help="requests per generate call (default: all)")
    ap.add_argument("--random-config", help="a config.json: random weights instead of --model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    import uora_rt

    trace = json.load(open(args.trace))
    if args.random_config:  # GPU benchmarks: random weights of a config's shape
        import torch

        rt = uora_rt.Runtime.random(json.loads(Path(args.random_config).read_text()),
                                    args.device, getattr(torch, args.dtype), slots=64)
    else:
        rt = uora_rt.load(args.model, slots=64)
    for kv in args.adapter:
        name, path = kv.split("=", 1)
        rt.add_adapter(path, name=name)
    rt.config["eos_token_id"] = None
    if rt.codec is not None:
        rt.codec.eos_id = None
    batch = args.batch or len(trace)
    tokens, first, finish, batch_tokens = {}, {}, {}, 0
    t0 = time.perf_counter()
    for i in range(0, len(trace), batch):  # static batches in arrival order
        part = trace[i:i + batch]
        gens = rt.generate([r["prompt_token_ids"] for r in part],
                           adapters=[r.get("adapter") for r in part],
                           max_new_tokens=max(r["max_tokens"] for r in part))
        done = time.perf_counter() - t0
        for r, g in zip(part, gens):
            tokens[r["id"]] = g.tokens[: r["max_tokens"]]
            first[r["id"]] = finish[r["id"]] = done
        batch_tokens += sum(len(g.tokens) for g in gens)
    wall = time.perf_counter() - t0
    out = result(trace, first, finish, tokens, wall, engine="legacy-generate@ecd107b",
                 batch_tokens=batch_tokens, batch=batch, package=uora_rt.__file__)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "requests"}, indent=1))


if __name__ == "__main__":
    main()
