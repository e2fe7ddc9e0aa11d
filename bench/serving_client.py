"""The load generator behind bench_serving.py: seeded request traces, a streaming OpenAI client
for any compatible endpoint, an in-process engine replay of the same trace, and the summary
statistics (vLLM `bench serve`'s definitions).

A trace is a list of {"id", "prompt_token_ids", "max_tokens", "adapter" (name or null),
"arrival_s"} (the format bench/peer_vllm.py replays on vLLM's engine). Prompts are token ids
(exact lengths, no tokenizer needed on the client), every request asks for exactly max_tokens
(`ignore_eos`), greedy.

Definitions: TTFT = first streamed token - arrival; TPOT = (last token - first token) /
(output tokens - 1) per request; ITL = gaps between a request's consecutive streamed chunks;
E2EL = last token - arrival; duration = first arrival to last finish; goodput = requests per
second meeting both SLOs (TTFT and TPOT).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time

import numpy as np


def make_trace(n, rate, adapters, dist="uniform", input_len=128, output_len=64,
               range_ratio=0.0, vocab=49152, seed=0, zipf_s=1.0) -> list[dict]:
    """n requests; rate: requests/s of a Poisson process (inf = one burst at t=0); adapters:
    names to draw from (empty: the base), uniformly or Zipf(s) in list order. Prompt ids and
    lengths depend on seed only, so setups that differ in adapters or rate share them."""
    g = random.Random(seed)

    def length(mean):
        lo, hi = int(mean * (1 - range_ratio)), int(mean * (1 + range_ratio))
        return max(1, g.randint(lo, hi))

    lo = 100 if vocab > 1000 else 3  # clear of the special tokens at the start of real vocabs
    reqs = []
    for i in range(n):
        p = length(input_len)
        reqs.append({"id": f"r{i}", "prompt_token_ids": [g.randrange(lo, vocab) for _ in range(p)],
                     "max_tokens": length(output_len)})
    pick = random.Random(seed + 1)
    weights = [1.0 / (k + 1) ** zipf_s for k in range(len(adapters))] if dist == "zipf" else None
    arrive = random.Random(seed + 2)
    t = 0.0
    for r in reqs:
        r["adapter"] = pick.choices(adapters, weights)[0] if adapters else None
        r["arrival_s"] = t
        if rate != float("inf"):
            t += arrive.expovariate(rate)
    return reqs


async def _one(http, url, base_model, r, t0, headers):
    await asyncio.sleep(max(0.0, t0 + r["arrival_s"] - time.perf_counter()))
    body = {"model": r["adapter"] or base_model, "prompt": r["prompt_token_ids"],
            "max_tokens": r["max_tokens"], "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    row = {"id": r["id"], "adapter": r["adapter"], "prompt_len": len(r["prompt_token_ids"]),
           "arrival_s": r["arrival_s"]}
    chunks, usage = [], None
    try:
        async with http.stream("POST", url + "/v1/completions", json=body,
                               headers=headers) as resp:
            if resp.status_code != 200:
                row["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return row
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    row["error"] = json.dumps(chunk["error"])[:300]
                    break
                if chunk.get("choices"):
                    chunks.append(time.perf_counter() - t0)
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    if not chunks:
        row.setdefault("error", "no tokens streamed")
        return row
    n = usage["completion_tokens"] if usage else len(chunks)
    row.update(n_out=n, first_token_s=chunks[0], finish_s=chunks[-1],
               itl=[b - a for a, b in itertools.pairwise(chunks)])
    return row


async def run_http(url, trace, base_model, api_key=None, concurrency_limit=None) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency_limit, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits) as http:
        t0 = time.perf_counter()
        rows = await asyncio.gather(*[_one(http, url, base_model, r, t0, headers)
                                      for r in trace])
    return {"requests": list(rows)}


def run_offline(engine, trace) -> dict:
    """The same trace on an in-process uora_rt.Engine (no HTTP, no event loop): the ceiling the
    server is measured against. Requests are added once wall time reaches their arrival."""
    from engine_trace import replay

    rows = {r["id"]: {"id": r["id"], "adapter": r["adapter"],
                      "prompt_len": len(r["prompt_token_ids"]), "arrival_s": r["arrival_s"],
                      "n_out": 0, "itl": []} for r in trace}
    last = {}
    for now, outs in replay(engine, trace):
        for o in outs:
            row = rows[o.request_id]
            if o.new_token_ids:
                row.setdefault("first_token_s", now)
                if o.request_id in last:
                    row["itl"].append(now - last[o.request_id])
                last[o.request_id] = now
                row["n_out"] += len(o.new_token_ids)
            if o.finished:
                row["finish_s"] = now
    return {"requests": list(rows.values())}


def _pcts(xs) -> dict:
    if not xs:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99))}


def summarize(result: dict, slo_ttft: float, slo_tpot: float) -> dict:
    """Adds throughput, latency percentiles and goodput to a run's result (in place)."""
    rows = result["requests"]
    ok = [r for r in rows if "error" not in r]
    for r in ok:
        r["ttft_s"] = r["first_token_s"] - r["arrival_s"]
        r["e2el_s"] = r["finish_s"] - r["arrival_s"]
        r["tpot_s"] = ((r["finish_s"] - r["first_token_s"]) / (r["n_out"] - 1)
                       if r["n_out"] > 1 else None)
    start = min(r["arrival_s"] for r in rows)
    duration = max((r["finish_s"] for r in ok), default=start) - start
    out_tokens = sum(r["n_out"] for r in ok)
    good = [r for r in ok if r["ttft_s"] <= slo_ttft and (r["tpot_s"] or 0) <= slo_tpot]
    result.update(
        completed=len(ok), failed=len(rows) - len(ok), duration_s=duration,
        request_throughput=len(ok) / duration if duration > 0 else None,
        output_throughput=out_tokens / duration if duration > 0 else None,
        total_token_throughput=(out_tokens + sum(r["prompt_len"] for r in ok)) / duration
        if duration > 0 else None,
        output_tokens=out_tokens, slo={"ttft_s": slo_ttft, "tpot_s": slo_tpot},
        goodput=len(good) / duration if duration > 0 else None,
        ttft_s=_pcts([r["ttft_s"] for r in ok]),
        tpot_s=_pcts([r["tpot_s"] for r in ok if r["tpot_s"] is not None]),
        itl_s=_pcts([x for r in ok for x in r["itl"]]),
        e2el_s=_pcts([r["e2el_s"] for r in ok]),
        errors=sorted({r["error"] for r in rows if "error" in r})[:5])
    for r in ok:
        del r["itl"]  # summarized; per-request rows keep the rest
    return result
