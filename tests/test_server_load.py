"""The server under load and faults of the client: 64 concurrent requests over 8 adapters while
another adapter is loaded and unloaded, a client that disconnects (streamed or not), and the
queue limit (503 + Retry-After under a burst, everything accepted still completes)."""

import asyncio
import json
import time

import httpx
import openai
import pytest

from server_helpers import parse_metrics, poll, tiny_world

MAIN_PROMPTS = ["alpha beta", "one two three four", "x", "Tell me about UORA.",
                "0123456789", "The rain in Spain", "ok", "a longer prompt with several words"]


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return tiny_world(request.config, tmp_path_factory)


def _request(i):
    """Request i of the 64: its adapter, prompt, and whether sampled / streamed (every prompt
    goes to all 8 adapters)."""
    kw = dict(model=f"a{i % 8}", prompt=MAIN_PROMPTS[i // 8], max_tokens=8 + 2 * (i // 8))
    if i % 3 == 0:
        kw.update(temperature=0.8, seed=1000 + i)
    else:
        kw.update(temperature=0)
    return kw, i % 4 == 0


async def _send(client, kw, stream):
    extra = {"return_token_ids": True}
    if not stream:
        r = await client.completions.create(**kw, extra_body=extra)
        return r.choices[0].token_ids, r.choices[0].text
    ids, text = [], ""
    async for chunk in await client.completions.create(**kw, stream=True, extra_body=extra):
        ids += chunk.choices[0].token_ids
        text += chunk.choices[0].text
    return ids, text


def test_64_concurrent_requests_over_8_adapters_while_one_churns(world):
    url = world.main.url
    before = world.main.metrics()

    async def churn(client, http):
        seen = []
        for _ in range(3):
            r = await http.post(url + "/v1/load_lora_adapter",
                                json={"lora_name": "churn", "lora_path": "x1.uora"})
            assert r.status_code == 200, r.text
            seen.append(await _send(client, dict(model="churn", prompt="churn", max_tokens=10,
                                                 temperature=0), False))
            r = await http.post(url + "/v1/unload_lora_adapter", json={"lora_name": "churn"})
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.05)
        return seen

    async def main():
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                                    timeout=120)
        async with httpx.AsyncClient(timeout=60) as http:
            jobs = [_send(client, *_request(i)) for i in range(64)]
            *answers, churned = await asyncio.gather(*jobs, churn(client, http))
        # Each request again, alone: the same answer (nothing mixed up between adapters).
        alone = [await _send(client, *_request(i)) for i in range(64)]
        load = await http_load(url, "churn", "x1.uora")
        churn_alone = await _send(client, dict(model="churn", prompt="churn", max_tokens=10,
                                               temperature=0), False)
        await http_unload(url, "churn")
        await client.close()
        return answers, churned, alone, load, churn_alone

    answers, churned, alone, load, churn_alone = asyncio.run(main())
    assert load == 200
    for i, (got, want) in enumerate(zip(answers, alone)):
        assert got == want, (i, _request(i))
    assert all(c == churn_alone for c in churned)
    # Adapters change the answers: a request served with the wrong one would show.
    same_prompt = {}
    for i in range(64):
        kw, _ = _request(i)
        if kw["temperature"] == 0:
            same_prompt.setdefault((kw["prompt"], kw["max_tokens"]), {})[kw["model"]] = alone[i]
    assert all(len({tuple(v[0]) for v in d.values()}) >= 4 for d in same_prompt.values())
    after = world.main.metrics()
    for a in range(8):
        key = f'uora_rt:requests_total{{model="a{a}"}}'
        assert after[key] - before.get(key, 0) == 16   # 8 concurrent + 8 alone, none dropped
    assert after["uora_rt:num_requests_running"] == 0
    assert after["uora_rt:kv_blocks_used"] == 0


async def http_load(url, name, path):
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(url + "/v1/load_lora_adapter",
                            json={"lora_name": name, "lora_path": path})
        return r.status_code


async def http_unload(url, name):
    async with httpx.AsyncClient(timeout=30) as http:
        return (await http.post(url + "/v1/unload_lora_adapter",
                                json={"lora_name": name})).status_code


def _aborted(m):
    return sum(v for k, v in m.items() if k.startswith("uora_rt:request_success_total")
               and 'finished_reason="abort"' in k)


def test_disconnect_mid_stream_aborts_and_frees_blocks(world):
    url = world.main.url
    before = world.main.metrics()
    body = {"model": "a3", "prompt": "stream then vanish", "max_tokens": 480,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            events = [next(x for x in lines if x.startswith("data: ")) for _ in range(3)]
            assert all(json.loads(e[6:])["choices"] for e in events)
            live = world.main.metrics()
            assert live["uora_rt:num_requests_running"] == 1
            assert live["uora_rt:kv_blocks_used"] > 0
        # Leaving the block closes the connection mid-stream.
    freed = poll(lambda: (m := world.main.metrics())["uora_rt:kv_blocks_used"] == 0
                 and m["uora_rt:num_requests_running"] == 0 and m)
    assert freed, "blocks still held after the client left"
    assert _aborted(freed) == _aborted(before) + 1
    produced = freed["uora_rt:generation_tokens_total"] - before["uora_rt:generation_tokens_total"]
    assert produced < 480


def test_disconnect_of_a_non_streamed_request_aborts_it(world):
    url = world.main.url
    before = world.main.metrics()
    body = {"model": "a5", "prompt": "wait for me", "max_tokens": 490, "ignore_eos": True,
            "temperature": 0}
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.15))
    freed = poll(lambda: (m := world.main.metrics())["uora_rt:num_requests_running"] == 0
                 and _aborted(m) == _aborted(before) + 1 and m)
    assert freed and freed["uora_rt:kv_blocks_used"] == 0
    full = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 8}, timeout=30)
    assert full.status_code == 200
    # It ended early: a full request of 490 tokens takes far longer than this.
    assert freed["uora_rt:generation_tokens_total"] - before["uora_rt:generation_tokens_total"] \
        < 490, time.monotonic() - t0


def test_queue_limit_answers_503_and_completes_what_it_accepted(world):
    url = world.queue.url  # --max-num-seqs 2 --max-queued-requests 3
    body = lambda i: {"model": "a0", "prompt": f"burst {i}", "max_tokens": 100,  # noqa: E731
                      "ignore_eos": True, "temperature": 0, "return_token_ids": True}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*[http.post(url + "/v1/completions", json=body(i))
                                          for i in range(20)])

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) >= 2, codes
    for i, r in enumerate(responses):
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            err = r.json()["error"]
            assert err["type"] == "ServiceUnavailableError" and err["code"] == 503
            assert "retry later" in err["message"]
        else:
            choice = r.json()["choices"][0]
            assert len(choice["token_ids"]) == 100
            alone = httpx.post(url + "/v1/completions", json=body(i), timeout=60).json()
            assert alone["choices"][0]["token_ids"] == choice["token_ids"]
    m = parse_metrics(httpx.get(url + "/metrics").text)
    assert m['uora_rt:requests_rejected_total{reason="queue_full"}'] == codes.count(503)
    assert m["uora_rt:num_requests_waiting"] == 0 and m["uora_rt:kv_blocks_used"] == 0
