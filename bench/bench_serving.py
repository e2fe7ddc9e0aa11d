"""Serving benchmark over HTTP, like vLLM's `bench serve`: Poisson arrivals at given rates (and
one burst), a random adapter per request (uniform or Zipf over N), seeded prompt/output lengths.
Reports request and output-token throughput, TTFT / TPOT / ITL p50/p90/p99 and goodput under an
SLO; writes one JSON record per (setup, rate) and a plot of latency against request rate.

The client speaks plain OpenAI HTTP (token-id prompts on /v1/completions, `ignore_eos`), so
it points at uora_rt or vLLM alike:

  python bench/bench_serving.py cpu            # all in one on this machine: SmolLM2, 16
                                               # adapters, starts `uora-rt serve`, sweeps, then
                                               # replays the same traces on the offline engine
  python bench/bench_serving.py prepare --out DIR --num 16      # the adapters (.uora)
  python bench/bench_serving.py run --base-url http://127.0.0.1:8000 --model NAME \\
      --adapters bench-0,...,bench-15 [--setups base,uniform,zipf] [--rates 0.5,1,2,inf] \\
      [--save-traces DIR] [--name serving_vllm_cpu]             # any OpenAI-compatible server
  python bench/bench_serving.py gpu --num-requests 300 --input-len 512 --output-len 128 \
      --vocab-size 32000 --rates 10,25,inf       # on an H200: 7B-shaped random bf16, 64 adapters
  python bench/bench_serving.py plot bench/results/serving_http_cpu.json

Traces saved with --save-traces are what bench/peer_vllm.py replays on vLLM's engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import serving_client as sc  # noqa: E402

INF = float("inf")


def trace_args(p):
    p.add_argument("--setups", default="base,uniform,zipf",
                   help="base (no adapter), uniform and/or zipf (over --adapters)")
    p.add_argument("--rates", default="0.5,1,2,inf", help="requests/s; inf = one burst")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=96)
    p.add_argument("--output-len", type=int, default=48)
    p.add_argument("--range-ratio", type=float, default=0.25, help="lengths uniform in "
                                                                   "mean * (1 +- ratio)")
    p.add_argument("--vocab-size", type=int, default=49152)
    p.add_argument("--zipf-s", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="seconds (goodput)")
    p.add_argument("--slo-tpot", type=float, default=0.25, help="seconds (goodput)")
    p.add_argument("--save-traces", metavar="DIR", help="write each trace (peer_vllm format)")
    p.add_argument("--name", help="results name (bench/results/NAME.json, NAME.png)")


def plan(args, adapters):
    """[(setup, rate, trace)] in run order: rates outer, setups inner, so drift of the machine
    hits every setup alike."""
    out = []
    for rate in [float(x) for x in args.rates.split(",")]:
        for setup in args.setups.split(","):
            if setup != "base" and not adapters:
                raise SystemExit(f"setup {setup!r} needs --adapters")
            names = [] if setup == "base" else adapters
            trace = sc.make_trace(args.num_requests, rate, names, "zipf" if setup == "zipf"
                                  else "uniform", args.input_len, args.output_len,
                                  args.range_ratio, args.vocab_size, args.seed, args.zipf_s)
            out.append((setup, rate, trace))
            if args.save_traces:
                d = Path(args.save_traces)
                d.mkdir(parents=True, exist_ok=True)
                (d / f"{setup}-{_rate(rate)}.json").write_text(json.dumps(trace))
    return out


def _rate(rate) -> str:
    return "burst" if rate == INF else f"{rate:g}"


def record(engine, setup, rate, adapters, args, result) -> dict:
    sc.summarize(result, args.slo_ttft, args.slo_tpot)
    return {"engine": engine, "setup": setup, "rate": _rate(rate),
            "distinct_adapters": 0 if setup == "base" else len(adapters),
            "num_requests": args.num_requests, "input_len": args.input_len,
            "output_len": args.output_len, "range_ratio": args.range_ratio, **result}


def sweep(url, model, adapters, args, engine="http", api_key=None, offline=None) -> list[dict]:
    """Every (setup, rate) over HTTP; offline(setup, rate, trace) -> a record or None runs right
    after the same trace (the server idle meanwhile), so drift hits both alike."""
    # Warm-up (not measured): the base and a few adapters, one short request each.
    warm = sc.make_trace(4, INF, adapters[:3], input_len=16, output_len=4, seed=99)
    warm[0]["adapter"] = None
    asyncio.run(sc.run_http(url, warm, model, api_key))
    records = []
    for setup, rate, trace in plan(args, adapters):
        t = time.perf_counter()
        rec = record(engine, setup, rate, adapters, args,
                     asyncio.run(sc.run_http(url, trace, model, api_key)))
        records.append(rec)
        _say(rec, time.perf_counter() - t)
        time.sleep(1.0)
        if offline is not None:
            t = time.perf_counter()
            rec = offline(setup, rate, trace)
            if rec is not None:
                records.append(rec)
                _say(rec, time.perf_counter() - t)
    return records


def _say(rec, seconds) -> None:
    print(f"{rec['engine']:15s} {rec['setup']:8s} rate {rec['rate']:5s}: "
          f"{rec['output_throughput']:.1f} tok/s, TTFT p50 {rec['ttft_s']['p50']:.3f} s, "
          f"TPOT p50 {rec['tpot_s']['p50']:.4f} s, {rec['failed']} failed ({seconds:.0f} s)",
          flush=True)


def table(records) -> str:
    head = ("| engine | setup | rate (req/s) | req/s | out tok/s | TTFT p50 / p90 / p99 (s) | "
            "TPOT p50 / p90 / p99 (ms) | ITL p99 (ms) | goodput (req/s) |")
    lines = [head, "|" + " --- |" * 9]
    for r in records:
        t, p, i = r["ttft_s"], r["tpot_s"], r["itl_s"]
        setup = r["setup"] if r["setup"] == "base" else f"{r['setup']} {r['distinct_adapters']}"
        lines.append(
            f"| {r['engine']} | {setup} | {r['rate']} | {r['request_throughput']:.2f} | "
            f"{r['output_throughput']:.1f} | {t['p50']:.2f} / {t['p90']:.2f} / {t['p99']:.2f} | "
            f"{1e3 * p['p50']:.0f} / {1e3 * p['p90']:.0f} / {1e3 * p['p99']:.0f} | "
            f"{1e3 * i['p99']:.0f} | {r['goodput']:.2f} |")
    return "\n".join(lines)


def plot(records, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"no matplotlib: {path.name} not drawn (redraw with: bench_serving.py plot JSON)")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(dict.fromkeys(r["rate"] for r in records))
    x = {rate: i for i, rate in enumerate(rates)}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [("ttft_s", "TTFT (s)", 1), ("tpot_s", "TPOT (ms)", 1e3)]
    groups = {}
    for r in records:
        groups.setdefault((r["engine"], r["setup"], r["distinct_adapters"]), []).append(r)
    for (engine, setup, n), rs in groups.items():
        label = f"{engine}: " + ("no adapters" if setup == "base" else f"{setup}, {n} adapters")
        style = "--" if engine.startswith("offline") else "-"
        xs = [x[r["rate"]] for r in rs]
        for ax, (key, _, scale) in zip(axes, panels):
            line, = ax.plot(xs, [scale * r[key]["p50"] for r in rs], style, marker="o",
                            label=f"{label} p50")
            ax.plot(xs, [scale * r[key]["p99"] for r in rs], style, marker="x", alpha=0.5,
                    color=line.get_color(), label=f"{label} p99")
        axes[2].plot(xs, [r["output_throughput"] for r in rs], style, marker="o", label=label)
    for ax, title in zip(axes, ["time to first token", "time per output token",
                                "output tokens / s"]):
        ax.set_xticks(range(len(rates)), rates)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("seconds")
    axes[1].set_ylabel("ms")
    axes[2].legend(fontsize=7)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def save(name, records, extra) -> None:
    path = common.write(name, records, extra)
    plot(records, path.with_suffix(".png"))
    print(table(records))


# --- subcommands ----------------------------------------------------------------------------
def cmd_prepare(args) -> list[Path]:
    import torch
    import uora_rt
    from uora_rt.core import format as fmt

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"bench-{i}.uora" for i in range(args.num)]
    if all(p.is_file() for p in paths):
        return paths
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rt = uora_rt.load(args.base)
    for i, p in enumerate(paths):
        fmt.save(common.random_adapter(rt, 1000 + i, args.r), p)
    print(f"wrote {len(paths)} adapters (r {args.r} on q/v) to {out}")
    return paths


def cmd_run(args) -> None:
    adapters = [a for a in (args.adapters or "").split(",") if a]
    records = sweep(args.base_url.rstrip("/"), args.model, adapters, args, args.engine,
                    args.api_key)
    save(args.name or "serving_http", records, {"base_url": args.base_url, "model": args.model})


def wait_healthy(url, server, log_name, tries=1200) -> None:
    import httpx

    for _ in range(tries):
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit(f"server exited {server.returncode}; see {log_name}")
        time.sleep(0.5)
    raise SystemExit(f"server not healthy after {tries / 2:.0f} s; see {log_name}")


def cmd_gpu(args) -> None:
    """One GPU: a Llama-2-7B-shaped model with random bf16 weights and N adapters (r on q/v),
    `uora-rt serve --random-weights` swept over HTTP with token-id prompts; then, the server
    gone (two 7B engines do not share one GPU's KV memory), the burst and highest-rate traces
    of the base and uniform setups replayed on an offline engine with warm graphs."""
    import torch
    import uora_rt
    from bench_engine_gpu import LLAMA2_7B
    from uora_rt.core import format as fmt

    folder = Path(args.out) / "llama2-7b"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LLAMA2_7B))
    load = lambda: uora_rt.Runtime.random(LLAMA2_7B, "cuda", torch.bfloat16, slots=256)  # noqa
    rt = load()
    names = [f"bench-{i}" for i in range(args.num)]
    paths = [Path(args.out) / f"{n}.uora" for n in names]
    for i, path in enumerate(paths):
        if not path.is_file():
            fmt.save(common.random_adapter(rt, 1000 + i, args.r), path)
    del rt
    torch.cuda.empty_cache()
    cmd = [sys.executable, "-m", "uora_rt", "serve", str(folder), "--random-weights",
           "--device", "cuda", "--dtype", "bfloat16", "--slots", "256", "--port", str(args.port),
           "--disable-access-log", "--log-level", "info",
           *[f"--adapter={n}={p}" for n, p in zip(names, paths)]]
    log = open(Path(tempfile.gettempdir()) / "serving_http_gpu.server.log", "w")
    t = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_healthy(url, server, log.name)
        started = time.perf_counter() - t
        print(f"server up in {started:.0f} s", flush=True)
        records = sweep(url, "llama2-7b", names, args, "uora_rt http")
        import httpx

        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    rates = [float(x) for x in args.rates.split(",")]
    keep = {INF, max([r for r in rates if r != INF], default=INF)}
    rt = load()
    for n, path in zip(names, paths):
        rt.add_adapter(path, n)
    engine = uora_rt.Engine(rt)  # the server's defaults
    engine.warmup(adapters=(None, names[0]))
    for setup, rate, trace in plan(args, names):
        if rate in keep and setup in ("base", "uniform"):
            t = time.perf_counter()
            records.append(record("offline engine", setup, rate, names, args,
                                  sc.run_offline(engine, trace)))
            _say(records[-1], time.perf_counter() - t)
    extra = {"server_command": " ".join(cmd[1:]), "server_start_s": started,
             "server_log_tail": Path(log.name).read_text()[-3000:],
             "server_metrics_tail": metrics[-2000:]}
    save(args.name or "serving_http_gpu", records, extra)


def cmd_cpu(args) -> None:
    """SmolLM2 + 16 adapters on this machine: `uora-rt serve` swept over HTTP; the burst and the
    highest rate (base and uniform setups) also replayed on an offline engine in this process,
    each right after its HTTP run."""
    import httpx
    import uora_rt

    args.base, args.r = "smollm2", 64
    paths = cmd_prepare(args)
    names = [p.stem for p in paths]
    port = args.port
    cmd = [sys.executable, "-m", "uora_rt", "serve", "smollm2", "--port", str(port),
           "--disable-access-log", "--log-level", "warning",
           *[f"--adapter={n}={p}" for n, p in zip(names, paths)]]
    load_before = os.getloadavg()
    log = open(Path(tempfile.gettempdir()) / "serving_http_cpu.server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        rt = uora_rt.load("smollm2", adapters=list(zip(names, paths)))
        engine = uora_rt.Engine(rt)  # the server's defaults
        sc.run_offline(engine, sc.make_trace(4, INF, names[:3], input_len=16, output_len=4,
                                             seed=99))
        rates = [float(x) for x in args.rates.split(",")]
        keep = {INF, max([r for r in rates if r != INF], default=INF)}

        def offline(setup, rate, trace):
            if rate not in keep or setup not in ("base", "uniform"):
                return None
            return record("offline engine", setup, rate, names, args,
                          sc.run_offline(engine, trace))

        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, log.name)
        records = sweep(url, "SmolLM2-135M-Instruct", names, args, "uora_rt http", None,
                        offline)
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(30)
        log.close()
    extra = {"server_command": " ".join(cmd[1:]), "loadavg_before": load_before,
             "loadavg_after": os.getloadavg(), "note": "client, server and offline engine share "
             "the machine's 2 cores (the offline engine runs while the server idles)",
             "server_metrics_tail": metrics[-2000:]}
    save(args.name or "serving_http_cpu", records, extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write N random UORA adapters (r on q/v) for a base")
    p.add_argument("--base", default="smollm2")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--r", type=int, default=64)
    p = sub.add_parser("run", help="sweep an OpenAI-compatible server")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True, help="the served base model's name")
    p.add_argument("--adapters", help="comma-separated served adapter names")
    p.add_argument("--api-key")
    p.add_argument("--engine", default="http", help="label in the results (e.g. vllm)")
    trace_args(p)
    p = sub.add_parser("cpu", help="SmolLM2 + 16 adapters here: server sweep + offline engine")
    p.add_argument("--out", default=str(Path.home() / ".cache/uora_rt/bench-serving-r64"))
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--port", type=int, default=8123)
    trace_args(p)
    p = sub.add_parser("gpu", help="one GPU: 7B-shaped random bf16 + N adapters, server sweep "
                                   "then the offline engine")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "bench-serving-gpu"))
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--r", type=int, default=256)
    p.add_argument("--port", type=int, default=8140)
    trace_args(p)
    p = sub.add_parser("plot", help="redraw the plot (and print the table) of a results file")
    p.add_argument("json")
    args = ap.parse_args()
    if args.cmd == "prepare":
        cmd_prepare(args)
    elif args.cmd == "run":
        cmd_run(args)
    elif args.cmd == "cpu":
        cmd_cpu(args)
    elif args.cmd == "gpu":
        cmd_gpu(args)
    else:
        records = common.read(args.json)["records"]
        plot(records, Path(args.json).with_suffix(".png"))
        print(table(records))


if __name__ == "__main__":
    main()
