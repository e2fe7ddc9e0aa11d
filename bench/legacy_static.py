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

All requests go into one generate call with max_new_tokens = the longest output (what a static
batch must do); each request counts only its own max_tokens. The call returns nothing until it
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
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE")
    args = ap.parse_args()
    import uora_rt

    trace = json.load(open(args.trace))
    rt = uora_rt.load(args.model, slots=64)
    for kv in args.adapter:
        name, path = kv.split("=", 1)
        rt.add_adapter(path, name=name)
    rt.config["eos_token_id"] = None
    if rt.codec is not None:
        rt.codec.eos_id = None
    prompts = [r["prompt_token_ids"] for r in trace]
    names = [r.get("adapter") for r in trace]
    longest = max(r["max_tokens"] for r in trace)
    t0 = time.perf_counter()
    gens = rt.generate(prompts, adapters=names, max_new_tokens=longest)
    wall = time.perf_counter() - t0
    tokens = {r["id"]: g.tokens[: r["max_tokens"]] for r, g in zip(trace, gens)}
    first = {r["id"]: wall for r in trace}
    finish = {r["id"]: wall for r in trace}
    out = result(trace, first, finish, tokens, wall, engine="legacy-generate@ecd107b",
                 batch_tokens=sum(len(g.tokens) for g in gens))
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if k != "requests"}, indent=1))


if __name__ == "__main__":
    main()
