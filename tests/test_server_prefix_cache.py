"""Prefix caching through the server (in this process, built from `uora-rt serve` arguments):
usage.prompt_tokens_details.cached_tokens in every response shape, the per-model metrics, an
adapter reloaded under the same name from a different file, and --no-enable-prefix-caching."""

import argparse

import httpx
import openai
import pytest

from engine_helpers import reference_greedy
from server_helpers import in_process_server, parse_metrics, tiny_adapters, tiny_base, tiny_fn
from uora_rt.commands import serve

# 40 characters: with the chat template's own characters, several full blocks of 16
PROMPT = "Shared instructions for every request: "


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-server")
    return tiny_base(root / "base"), tiny_adapters(root / "adapters", 3)


def _server(base, adapters, *flags):
    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args([str(base), *(f"--adapter={n}={f}" for n, f in adapters.items()),
                         "--allow-adapter-loading", "--adapter-dir", str(next(
                             iter(adapters.values())).parent), *flags])
    return serve.build_local(args)


def _cached(usage) -> int:
    return usage.prompt_tokens_details.cached_tokens


def test_cached_tokens_in_usage_metrics_and_reloads(files):
    base, adapters = files
    app, _ = _server(base, {"a0": adapters["a0"], "a1": adapters["a1"]})
    with in_process_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        first = client.completions.create(model="a0", prompt=PROMPT, max_tokens=4,
                                          temperature=0)
        assert _cached(first.usage) == 0
        full = (first.usage.prompt_tokens - 1) // 16 * 16
        again = client.completions.create(model="a0", prompt=PROMPT + "more", max_tokens=4,
                                          temperature=0)
        assert _cached(again.usage) == full
        chats = [client.chat.completions.create(model="a0", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": PROMPT}])
                 for _ in range(2)]
        chat_full = (chats[0].usage.prompt_tokens - 1) // 16 * 16
        assert _cached(chats[1].usage) == chat_full  # the same messages again
        stream = list(client.completions.create(
            model="a0", prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True}))
        assert all(_cached(c.usage) == full for c in stream)
        assert _cached(client.completions.create(model="a1", prompt=PROMPT, max_tokens=4,
                                                 temperature=0).usage) == 0
        # a different file under a0's name: nothing of the old a0 is read
        def post(path, body):
            return httpx.post(url + path, json=body, timeout=30)

        assert post("/v1/unload_lora_adapter", {"lora_name": "a0"}).status_code == 200
        assert post("/v1/load_lora_adapter", {"lora_name": "a0",
                                              "lora_path": "a2.uora"}).status_code == 200
        r = client.completions.create(model="a0", prompt=PROMPT, max_tokens=6, temperature=0,
                                      extra_body={"return_token_ids": True})
        assert _cached(r.usage) == 0
        ids = r.choices[0].prompt_token_ids
        assert r.choices[0].token_ids == reference_greedy(tiny_fn, adapters["a2"], ids, 6)
        m = parse_metrics(httpx.get(url + "/metrics").text)
        a0 = [first, again, *chats, r]
        assert m['uora_rt:prefix_cache_queries_total{model="a0"}'] == \
            sum(x.usage.prompt_tokens for x in a0) + stream[-1].usage.prompt_tokens
        assert m['uora_rt:prefix_cache_hits_total{model="a0"}'] == 2 * full + chat_full
        assert m['uora_rt:prefix_cache_queries_total{model="a1"}'] == first.usage.prompt_tokens
        assert m['uora_rt:prefix_cache_hits_total{model="a1"}'] == 0
        assert 'uora_rt:prefix_cache_queries_total{model="base"}' not in m
        assert m["uora_rt:kv_blocks_cached"] >= full // 16


def test_no_enable_prefix_caching(files):
    base, adapters = files
    app, state = _server(base, {"a0": adapters["a0"]}, "--no-enable-prefix-caching")
    assert state.engine.engine.prefix_caching is False
    with in_process_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        for _ in range(2):
            r = client.completions.create(model="base", prompt=PROMPT, max_tokens=3,
                                          temperature=0)
            assert _cached(r.usage) == 0
        m = parse_metrics(httpx.get(url + "/metrics").text)
        assert m['uora_rt:prefix_cache_hits_total{model="base"}'] == 0
        assert m['uora_rt:prefix_cache_queries_total{model="base"}'] == 2 * r.usage.prompt_tokens


def test_prefix_cache_series_stay_bounded():
    """The first PREFIX_CACHE_LABELS adapter names the engine saw get their own series; later
    names add to model="other"."""
    from types import SimpleNamespace

    from uora_rt.engine.messages import Stats
    from uora_rt.server.metrics import PREFIX_CACHE_LABELS, Metrics

    n = PREFIX_CACHE_LABELS + 10
    per = {None: (7, 3), **{f"x{i}": (10, i % 2) for i in range(n)}}
    stats = Stats(0, 0, 1, 10, 2, [("" if k is None else k, q, h) for k, (q, h) in per.items()])
    engine = SimpleNamespace(stats=stats, adapters=[])
    m = parse_metrics(Metrics(engine, base_name="smol").render().decode())
    queries = {k: v for k, v in m.items() if k.startswith("uora_rt:prefix_cache_queries_total")}
    assert len(queries) == PREFIX_CACHE_LABELS + 1  # the base's series is one of the first
    assert queries['uora_rt:prefix_cache_queries_total{model="smol"}'] == 7
    assert m['uora_rt:prefix_cache_hits_total{model="smol"}'] == 3
    labeled = PREFIX_CACHE_LABELS - 1
    assert queries['uora_rt:prefix_cache_queries_total{model="other"}'] == 10 * (n - labeled)
    assert sum(queries.values()) == 7 + 10 * n
