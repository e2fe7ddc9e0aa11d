"""Offline request traces and their metrics, shared by bench_engine.py and the peers it runs
(peer_vllm.py, legacy_static.py). Pure Python: it runs under the vLLM and legacy interpreters too.

A trace is a list of {"id", "prompt_token_ids", "max_tokens", "adapter": name | None,
"arrival_s"}. Lengths are log-uniform integers (many short requests, a few long ones); prompts
are random token ids; outputs are fixed-length (ignore_eos), so every setup does the same work.
"""

from __future__ import annotations

import math
import random
import time


def loguniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))


def make_trace(n: int, vocab: int, seed: int = 0, prompt=(16, 2048), output=(16, 512),
               adapters: int = 0, zipf: bool = False, rate: float | None = None,
               names: list[str] | None = None) -> list[dict]:
    """n requests; adapters: how many distinct adapter names to spread them over (0 = none);
    zipf: weights 1/k instead of uniform; rate: Poisson arrivals per second (None = all at
    t=0). Lengths and prompts depend only on (n, vocab, seed, prompt, output), so traces that
    differ in adapters or arrivals carry the same work."""
    work, pick, clock = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    names = names or [f"ad{i}" for i in range(adapters)]
    weights = [1.0 / (k + 1) for k in range(len(names))] if zipf else None
    trace, t = [], 0.0
    for i in range(n):
        p = loguniform(work, *prompt)
        out = loguniform(work, *output)
        ids = [work.randrange(vocab) for _ in range(p)]
        ad = pick.choices(names, weights)[0] if names else None
        if rate:
            t += clock.expovariate(rate)
        trace.append({"id": f"r{i}", "prompt_token_ids": ids, "max_tokens": out, "adapter": ad,
                      "arrival_s": t})
    return trace


def replay(engine, trace):
    """Replays a trace on an idle uora_rt.Engine in real time: each request is added once wall
    time reaches its arrival (max_tokens, ignore_eos). Yields (seconds since the start, the
    step's outputs) after every step, until every request has finished."""
    from uora_rt import SamplingParams  # here: the peers' interpreters have no uora_rt

    pending = sorted(trace, key=lambda r: r["arrival_s"])[::-1]  # next arrival last
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[-1]["arrival_s"] <= now:
            r = pending.pop()
            engine.add_request(r["prompt_token_ids"], r["adapter"], SamplingParams(
                max_tokens=r["max_tokens"], ignore_eos=True), request_id=r["id"])
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[-1]["arrival_s"] - (time.perf_counter() - t0)))
            continue
        outs = engine.step()
        yield time.perf_counter() - t0, outs

def pct(xs, q):
    """Linear-interpolated percentile (numpy's default); None for an empty list."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(xs):
    return {"p50": pct(xs, 50), "p99": pct(xs, 99), "mean": sum(xs) / len(xs) if xs else None}


def result(trace, first: dict, finish: dict, tokens: dict, wall: float, **extra) -> dict:
    """Per-request rows and the trace's summary. first/finish: request id -> seconds since the
    first add (the trace clock); tokens: id -> generated token ids."""
    rows, ttft, tpot = [], [], []
    for r in trace:
        rid, n = r["id"], len(tokens[r["id"]])
        row = {"id": rid, "adapter": r.get("adapter"), "prompt_len": len(r["prompt_token_ids"]),
               "n_out": n, "arrival_s": r["arrival_s"], "ttft_s": first[rid] - r["arrival_s"],
               "tpot_s": (finish[rid] - first[rid]) / (n - 1) if n > 1 else None}
        ttft.append(row["ttft_s"])
        if row["tpot_s"] is not None:
            tpot.append(row["tpot_s"])
        rows.append(row)
    total = sum(len(v) for v in tokens.values())
    return {"n_requests": len(trace), "wall_s": wall, "total_output_tokens": total,
            "output_tokens_per_s": total / wall, "ttft_s": summary(ttft), "tpot_s": summary(tpot),
            **extra, "requests": rows}
