"""The engine on one GPU (H200, bf16, random weights): the decode step replayed from its CUDA
graph and through the public API (engine.step) against the byte floor, with and without 64
distinct UORA adapters (r=256 on q/v); sampled vs greedy; prefill; an offline trace on a
Llama-2-7B shape and a Llama-3.1-8B shape (GQA 8, vocabulary 128,256).

  python bench/bench_engine_gpu.py [--budget-s 420] [--requests 1000] [--traces-only]
      [--models llama2-7b,llama3.1-8b] [--adapters-max 1000] [--no-matrix] [--peers 128]

Traces run on one engine per model whose decode graphs are captured first (Engine.warmup), as
a server's are; the warm-up's seconds and captures are recorded.

Sections run in that order and the JSON (bench/results/engine_gpu.json) is rewritten after
each, so a run cut short by its time budget keeps what it measured.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import engine_trace  # noqa: E402
import torch  # noqa: E402
from bench_engine import run_engine, run_peer, summary_row, transformers_generate  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt import Engine, SamplingParams  # noqa: E402
from uora_rt.engine.sampler import Sampler  # noqa: E402
from uora_rt.core import format as fmt  # noqa: E402
from uora_rt.core.projections import ALGORITHM, ProjectionSpec  # noqa: E402

LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                 hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA3_8B = dict(LLAMA2_7B, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                 rope_theta=500000.0, max_position_embeddings=8192)


def synthetic_adapter(rt, seed: int, r: int = 256, suffixes=("q_proj", "v_proj")) -> fmt.Adapter:
    """Random vectors on every layer's q/v (speed does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    sites = [s for s in rt.manager.sites.values() if s.name.rsplit(".", 1)[-1] in suffixes]
    spec = ProjectionSpec(ALGORITHM, 0, r, max(s.inp for s in sites), max(s.out for s in sites))
    return fmt.Adapter(spec, [s.name for s in sites],
                       {s.name: torch.randn(s.out, generator=g) * 0.01 for s in sites},
                       {s.name: torch.randn(r, generator=g) * 0.1 for s in sites},
                       torch.ones(r), torch.zeros(r, dtype=torch.int32),
                       {"architecture": "LlamaForCausalLM",
                        "modules": {s.name: [s.out, s.inp] for s in sites}})


def cuda_ms(fn, iters=20) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def free_memory() -> None:
    """What finished engines held (their KV pool and graphs sit in reference cycles), back to
    the device before the next setup or model."""
    gc.collect()
    torch.cuda.empty_cache()


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (cuda_ms(lambda: y.copy_(x), 10) / 1e3)


def settle(engine, steps=3) -> None:
    """Steps until every added request has its whole prompt computed, then `steps` more: the
    engine is then in the decode-only steady state (requests reach the scheduler at a step)."""
    while any(r.computed < r.prompt_len for r in engine.scheduler.running) or \
            engine.scheduler.num_waiting or not engine.scheduler.running:
        if not engine.has_unfinished():
            raise RuntimeError("the benchmark's requests failed (see the engine's log)")
        engine.step()
    for _ in range(steps):
        engine.step()


# Sampling settings of the decode-step section. Random weights give nearly flat next-token
# distributions, where top-p 0.9 keeps ~90 % of the vocabulary: every row outruns the device
# path's window and is re-drawn by the full sort after a synchronization (fallback_rows counts
# them), a case a trained model rarely produces. "top_k" (top-k 50 before top-p 0.9) keeps the
# window path without fallbacks; "temperature" needs no window, so its steps stay asynchronous;
# "top_p_sort" is top-p on the full-sort sampler path (one sort of every row, sync-free).
# name -> (SamplingParams settings, sampler path: None = the engine's default)
SAMPLING = {"greedy": ({"temperature": 0.0}, None),
            "top_p": ({"temperature": 0.7, "top_p": 0.9, "seed": 1}, None),
            "top_k": ({"temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 1}, None),
            "temperature": ({"temperature": 0.7, "seed": 1}, None),
            "top_p_sort": ({"temperature": 0.7, "top_p": 0.9, "seed": 1}, "full_sort")}


def decode_step(rt, batch, names, ctx=512, steps=20, sampling="greedy",
                async_scheduling=True) -> dict:
    """Requests with ctx-token prompts decoding together; per step: graph replay (CUDA events)
    and engine.step() wall time (host work included), and how many steps ran synchronously and
    rows the sampler re-drew with the full sort."""
    engine = Engine(rt, kv_cache_tokens=batch * (ctx + steps + 64), max_num_seqs=batch,
                    async_scheduling=async_scheduling)
    settings, path = SAMPLING[sampling]
    if path is not None:  # before the first step: CUDA graphs capture the sampler's draw
        engine.runner.sampler = Sampler("cuda", path=path)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 40, ignore_eos=True, **settings)
    for i in range(batch):
        engine.add_request(torch.randint(0, rt.model.spec.vocab, (ctx,), generator=g).tolist(),
                           names[i % len(names)] if names else None, params)
    settle(engine)
    torch.cuda.synchronize()
    fallback0 = engine.runner.sampler.fallback_rows
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    api_ms = (time.perf_counter() - t) / steps * 1e3
    fallback = engine.runner.sampler.fallback_rows - fallback0
    graphs = engine.runner.graphs
    graph, _ = next(reversed(graphs.graphs.values()))
    replay_ms = cuda_ms(graph.replay)
    spec = rt.model.spec
    kv_bytes = batch * (ctx + steps) * spec.layers * 2 * spec.kv_heads * spec.head_dim * 2
    for rid in list(engine._live):
        engine.abort(rid)
    engine.run_until_done()
    captures = graphs.captures
    del engine, graphs, graph
    free_memory()
    return {"batch": batch, "adapters": len(set(names or [])), "sampled": sampling != "greedy",
            "sampling": sampling, "fallback_rows_per_step": fallback / steps,
            "async_scheduling": async_scheduling,
            "graph_ms": replay_ms, "api_ms": api_ms, "kv_bytes": kv_bytes,
            "captures": captures}


def peers(rt, engine, cfg, n, which) -> list[dict]:
    """The same n-request trace (no adapters) through our warm engine, transformers generate
    (bf16, eager, left-padded batches of 64) and the static generate this engine replaced
    (ecd107b, batches of 32: its static KV for 64 x 2,560 positions did not fit beside the
    benchmark's own weights). Peers run
    after ours with our engine's memory returned; the old package runs in its own process
    (both register the `uora` op library) from LEGACY_PYTHONPATH."""
    import json
    import os
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    trace = engine_trace.make_trace(n, cfg["vocab_size"], seed=0)
    out = [run_engine(rt, trace, f"engine, no adapters ({n} requests)", engine=engine)]
    engine.kv = engine.runner = None  # the KV pool and graphs go before the peers load
    free_memory()
    rows = []
    say = lambda r: print(f"  {r['setup']}: {r['output_tokens_per_s']:.0f} tok/s")  # noqa: E731
    say(out[0])
    if "transformers" in which:
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.bfloat16).eval()
        out.append(transformers_generate(None, trace, batch=64, model=model))
        say(out[-1])
        del model
        free_memory()
    legacy = os.environ.get("LEGACY_PYTHONPATH")
    if legacy and "legacy" in which:
        tmp = Path(tempfile.mkdtemp())
        (tmp / "trace.json").write_text(json.dumps(trace))
        (tmp / "config.json").write_text(json.dumps(cfg))
        res = run_peer(sys.executable, "legacy_static.py", [
            "--random-config", str(tmp / "config.json"), "--device", "cuda", "--dtype",
            "bfloat16", "--batch", "32", "--trace", str(tmp / "trace.json")],
            "old static generate (batches of 32)", env={"PYTHONPATH": legacy})
        if res and not res["package"].startswith(legacy):  # never the new package by mistake
            raise SystemExit(f"the old generate ran from {res['package']}, not {legacy}")
        if res:
            out.append(res)
            say(res)
    for r in out:
        r.pop("token_ids", None)
        rows.append({"kind": "peer_trace", "model": "llama2-7b", "requests": n,
                     **summary_row(r)})
    return rows


def trace_setups(model: str, many: int) -> list[tuple[str, dict]]:
    """The issue's trace matrix on the 7B shape (the first is the no-adapter baseline whose
    throughput sets the Poisson rate); the 8B shape with and without 64 distinct."""
    if model != "llama2-7b":
        return [("no adapters", {}), ("64 distinct (uniform)", dict(adapters=64))]
    return [("no adapters", {}), ("1 adapter", dict(adapters=1)),
            ("64 distinct (uniform)", dict(adapters=64)),
            ("64 distinct (Zipf)", dict(adapters=64, zipf=True)),
            (f"{many} distinct (uniform)", dict(adapters=many)),
            (f"{many} distinct (Zipf)", dict(adapters=many, zipf=True)),
            ("no adapters, Poisson", dict(poisson=True)),
            ("64 distinct, Poisson", dict(adapters=64, poisson=True))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--adapters-max", type=int, default=1000, help="registered for the traces")
    ap.add_argument("--models", default="llama2-7b,llama3.1-8b")
    ap.add_argument("--traces-only", action="store_true", help="skip the decode-step section")
    ap.add_argument("--matrix", action=argparse.BooleanOptionalAction, default=True,
                    help="the trace matrix (adapters x distributions x arrivals)")
    ap.add_argument("--trace-setups", type=int, default=None,
                    help="only the first N setups of the trace matrix (the first is no adapters)")
    ap.add_argument("--peers", type=int, default=0, help="also an N-request trace through "
                    "transformers and the old static generate (LEGACY_PYTHONPATH)")
    ap.add_argument("--peer-set", default="transformers,legacy")
    ap.add_argument("--name", default="engine_gpu")
    ap.add_argument("--batches", default=None, help="decode batches (default: 1,16,64,256 on "
                    "the 7B shape, 64,256 on the 8B one)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--sampling", default="top_p,top_k,temperature,top_p_sort",
                    help=f"sampled settings of the decode-step section, of {list(SAMPLING)[1:]}")
    ap.add_argument("--sampling-batches", default="64,256",
                    help="the decode batches that also run the sampled settings")
    args = ap.parse_args()
    sampling_batches = {int(b) for b in args.sampling_batches.split(",")}
    bad = [m for m in args.sampling.split(",") if m not in SAMPLING or m == "greedy"]
    if bad:
        ap.error(f"--sampling: unknown setting(s) {bad}; known: {list(SAMPLING)[1:]}")
    t_start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    records = []
    bw = copy_bandwidth()
    records.append({"kind": "ceiling", "copy_bytes_per_s": bw})

    def save():
        common.write(args.name, records)

    for cfg_name, cfg in (("llama2-7b", LLAMA2_7B), ("llama3.1-8b", LLAMA3_8B)):
        if cfg_name not in args.models.split(","):
            continue
        if left() < 60:
            break
        rt = uora_rt.Runtime.random(cfg, device="cuda", dtype=torch.bfloat16, slots=256)
        weights = sum(p.numel() * p.element_size() for p in rt.model.parameters())
        for i in range(64):
            rt.add_adapter(synthetic_adapter(rt, i), name=f"ad{i}")
        names64 = [f"ad{i}" for i in range(64)]
        batches = () if args.traces_only else \
            tuple(int(b) for b in args.batches.split(",")) if args.batches else \
            (1, 16, 64, 256) if cfg_name == "llama2-7b" else (64, 256)
        for batch in batches:
            sampled = args.sampling.split(",") if batch in sampling_batches else ()
            for names, sampling in ((None, "greedy"), (names64, "greedy"),
                                    *((None, m) for m in sampled)):
                if left() < 45:
                    break
                d = decode_step(rt, batch, names, sampling=sampling,
                                async_scheduling=args.async_scheduling)
                d.update(kind="decode", model=cfg_name, weights_bytes=weights,
                         floor_ms=(weights + d["kv_bytes"]) / bw * 1e3)
                records.append(d)
                print(f"  {cfg_name} decode batch {batch:3} adapters {d['adapters']:2} "
                      f"{sampling:11}: graph {d['graph_ms']:.2f} ms, "
                      f"step() {d['api_ms']:.2f} ms, floor {d['floor_ms']:.2f} ms, "
                      f"{d['fallback_rows_per_step']:.1f} rows re-drawn per step")
                save()
        if not args.matrix and not args.peers:  # decode steps only: no trace engine
            del rt
            free_memory()
            continue
        if args.adapters_max > 64:  # the same kind of adapter, many more of them
            for i in range(64, args.adapters_max):
                rt.add_adapter(synthetic_adapter(rt, i), name=f"ad{i}")
        engine = Engine(rt, max_num_seqs=256)
        warm = engine.warmup(adapters=(None, "ad0"))
        records.append({"kind": "warmup", "model": cfg_name, "seconds": warm,
                        "captures": engine.runner.graphs.captures})
        print(f"  {cfg_name}: {engine.runner.graphs.captures} graphs captured in {warm:.1f} s")
        rate = None
        setups = trace_setups(cfg_name, args.adapters_max)[:args.trace_setups]
        for label, kw in setups if args.matrix else ():
            if left() < 75:
                break
            if kw.pop("poisson", False):
                kw["rate"] = rate
            trace = engine_trace.make_trace(args.requests, cfg["vocab_size"], seed=0, **kw)
            res = run_engine(rt, trace, f"{cfg_name} trace, {label}", engine=engine)
            res.pop("token_ids")
            if rate is None:  # Poisson arrivals at about the all-at-once throughput
                rate = args.requests / res["wall_s"]
            records.append({"kind": "trace", "model": cfg_name, "requests": args.requests,
                            "rate_per_s": kw.get("rate"),
                            "captures_total": engine.runner.graphs.captures, **summary_row(res)})
            print(f"  {cfg_name} trace ({args.requests} requests, {label}): "
                  f"{res['output_tokens_per_s']:.0f} output tok/s, TTFT p50 "
                  f"{res['ttft_s']['p50']:.2f} s, TPOT p50 {res['tpot_s']['p50'] * 1e3:.1f} ms,"
                  f" host {res['host_share']:.1%}")
            save()
        if args.peers and cfg_name == "llama2-7b" and left() > 120:
            records += peers(rt, engine, cfg, args.peers, args.peer_set.split(","))
            save()
        del engine
        del rt
        free_memory()
    print(f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
