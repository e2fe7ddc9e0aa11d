"""The engine on one GPU (H200, bf16, random weights): the decode step replayed from its CUDA
graph and through the public API (engine.step) against the byte floor, with and without 64
distinct UORA adapters (r=256 on q/v); sampled vs greedy; prefill; an offline trace on a
Llama-2-7B shape and a Llama-3.1-8B shape (GQA 8, vocabulary 128,256).

  python bench/bench_engine_gpu.py [--budget-s 420] [--requests 256] [--traces-only]

Sections run in that order and the JSON (bench/results/engine_gpu.json) is rewritten after
each, so a run cut short by its time budget keeps what it measured.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import engine_trace  # noqa: E402
import torch  # noqa: E402
from bench_engine import run_engine, summary_row  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt import Engine, SamplingParams  # noqa: E402
from uora_rt import format as fmt  # noqa: E402
from uora_rt.projections import ALGORITHM, ProjectionSpec  # noqa: E402

LLAMA2_7B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000,
                 hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                 rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False)
LLAMA3_8B = dict(LLAMA2_7B, vocab_size=128256, intermediate_size=14336, num_key_value_heads=8,
                 rope_theta=500000.0, max_position_embeddings=8192)


def synthetic_adapter(rt, seed: int, r: int = 256, suffixes=("q_proj", "v_proj")) -> fmt.Adapter:
    """Random vectors on every layer's q/v (speed does not depend on the values)."""
    g = torch.Generator().manual_seed(seed)
    sites = [s for s in rt.pool.sites.values() if s.name.rsplit(".", 1)[-1] in suffixes]
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


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() / (cuda_ms(lambda: y.copy_(x), 10) / 1e3)


def decode_step(rt, batch, names, ctx=512, steps=20, sampled=False) -> dict:
    """Requests with ctx-token prompts decoding together; per step: graph replay (CUDA events)
    and engine.step() wall time (host work included)."""
    engine = Engine(rt, kv_cache_tokens=batch * (ctx + steps + 64), max_num_seqs=batch)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=steps + 40, ignore_eos=True, temperature=0.7 if sampled
                            else 0.0, top_p=0.9 if sampled else 1.0, seed=1 if sampled else None)
    for i in range(batch):
        engine.add_request(torch.randint(0, rt.model.spec.vocab, (ctx,), generator=g).tolist(),
                           names[i % len(names)] if names else None, params)
    while any(r.computed < r.prompt_len for r in engine.scheduler.running) or \
            engine.scheduler.num_waiting or not engine.scheduler.running:
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    api_ms = (time.perf_counter() - t) / steps * 1e3
    graphs = engine.runner.graphs
    graph, _ = next(reversed(graphs.graphs.values()))
    replay_ms = cuda_ms(graph.replay)
    spec = rt.model.spec
    kv_bytes = batch * (ctx + steps) * spec.layers * 2 * spec.kv_heads * spec.head_dim * 2
    for rid in list(engine._live):
        engine.abort(rid)
    engine.run_until_done()
    return {"batch": batch, "adapters": len(set(names or [])), "sampled": sampled,
            "graph_ms": replay_ms, "api_ms": api_ms, "kv_bytes": kv_bytes,
            "captures": graphs.captures}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--traces-only", action="store_true", help="skip the decode-step section")
    ap.add_argument("--name", default="engine_gpu")
    args = ap.parse_args()
    t_start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - t_start)  # noqa: E731
    records = []
    bw = copy_bandwidth()
    records.append({"kind": "ceiling", "copy_bytes_per_s": bw})

    def save():
        common.write(args.name, records)

    for cfg_name, cfg in (("llama2-7b", LLAMA2_7B), ("llama3.1-8b", LLAMA3_8B)):
        if left() < 60:
            break
        rt = uora_rt.Runtime.random(cfg, device="cuda", dtype=torch.bfloat16, slots=256)
        weights = sum(p.numel() * p.element_size() for p in rt.model.parameters())
        for i in range(64):
            rt.add_adapter(synthetic_adapter(rt, i), name=f"ad{i}")
        names64 = [f"ad{i}" for i in range(64)]
        batches = () if args.traces_only else (1, 16, 64, 256) if cfg_name == "llama2-7b" \
            else (64, 256)
        for batch in batches:
            for names, sampled in ((None, False), (names64, False), (None, True)):
                if left() < 45:
                    break
                d = decode_step(rt, batch, names, sampled=sampled)
                d.update(kind="decode", model=cfg_name, weights_bytes=weights,
                         floor_ms=(weights + d["kv_bytes"]) / bw * 1e3)
                records.append(d)
                print(f"  {cfg_name} decode batch {batch:3} adapters {d['adapters']:2} "
                      f"{'sampled' if sampled else 'greedy '}: graph {d['graph_ms']:.2f} ms, "
                      f"step() {d['api_ms']:.2f} ms, floor {d['floor_ms']:.2f} ms")
                save()
        for adapters in (0, 64):
            if left() < 60:
                break
            trace = engine_trace.make_trace(args.requests, cfg["vocab_size"], seed=0,
                                            adapters=adapters)
            res = run_engine(rt, trace, f"{cfg_name} trace, {adapters} adapters",
                             max_num_seqs=256)
            res.pop("token_ids")
            records.append({"kind": "trace", "model": cfg_name, **summary_row(res)})
            print(f"  {cfg_name} trace ({args.requests} requests, {adapters} adapters): "
                  f"{res['output_tokens_per_s']:.0f} output tok/s, TTFT p50 "
                  f"{res['ttft_s']['p50']:.2f} s, TPOT p50 {res['tpot_s']['p50'] * 1e3:.1f} ms")
            save()
        del rt
        torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
