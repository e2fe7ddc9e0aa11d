"""`uora-rt serve` through the official openai client: completions, chat, streaming, `model`
switching, /v1/models after load and unload. Greedy answers are checked against rt.generate
(same runtime, in this process) and against transformers + PEFT VeRA (an independent
implementation)."""

import httpx
import openai
import pytest

from engine_helpers import reference_greedy
from server_helpers import openai_client, tiny_fn, tiny_world

PROMPTS = ["Hello there", "The quick brown fox", "UORA adapters: ", "What is 2 + 2?"]


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return tiny_world(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def client(world):
    return openai_client(world)


def complete(client, model, prompt, n=12, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                     extra_body={"return_token_ids": True, **kw.pop("extra", {})},
                                     **kw)


def test_models_lists_the_base_and_every_adapter(world, client):
    cards = client.models.list().data
    assert [c.id for c in cards] == ["base", *sorted(world.adapters)]
    base, *ads = cards
    assert base.parent is None and base.max_model_len == 512
    assert base.root == str(world.base)
    assert all(c.parent == "base" and c.owned_by == "uora_rt" for c in ads)
    assert {c.id: c.root for c in ads} == {n: str(p.resolve()) for n, p in world.adapters.items()}


@pytest.mark.parametrize("model", ["base", "a0", "a1", "a2"])
def test_greedy_completion_equals_generate_and_peft(world, client, model):
    adapter = None if model == "base" else model
    for prompt in PROMPTS[:2]:
        r = complete(client, model, prompt, 12)
        choice = r.choices[0]
        ref = world.rt.generate([prompt], adapters=[adapter], max_new_tokens=12, chat=False)[0]
        assert choice.token_ids == ref.tokens and choice.text == ref.text
        ids = world.rt.codec.tok.encode(prompt).ids       # completions: no chat template, + BOS
        assert choice.prompt_token_ids == ids
        path = None if adapter is None else world.adapters[adapter]
        assert choice.token_ids == reference_greedy(tiny_fn, path, ids, 12)
        eos = choice.finish_reason == "stop" and choice.stop_reason is None
        assert r.usage.prompt_tokens == len(ids)
        assert r.usage.completion_tokens == len(choice.token_ids) + eos
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.model == model and r.id.startswith("cmpl-") and r.object == "text_completion"


def test_token_id_prompts_and_batches(world, client):
    prompts = [[1, 40, 41, 42, 43], [1, 60, 61], [1, 70] * 9]
    single = [complete(client, "a3", p, 10).choices[0] for p in prompts]
    for p, c in zip(prompts, single):
        assert c.token_ids == reference_greedy(tiny_fn, world.adapters["a3"], p, 10)
    batch = complete(client, "a3", prompts, 10)
    assert [c.index for c in batch.choices] == [0, 1, 2]
    assert [c.token_ids for c in batch.choices] == [c.token_ids for c in single]
    assert batch.usage.prompt_tokens == sum(map(len, prompts))
    texts = complete(client, "a3", PROMPTS[:3], 6)
    assert [c.text for c in texts.choices] == [complete(client, "a3", p, 6).choices[0].text
                                               for p in PROMPTS[:3]]


@pytest.mark.parametrize("model", ["base", "a4"])
def test_chat_equals_generate_through_the_chat_template(world, client, model):
    adapter = None if model == "base" else model
    for prompt in PROMPTS[2:]:
        r = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": prompt}])
        ref = world.rt.generate([prompt], adapters=[adapter], max_new_tokens=12)[0]
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == ref.prompt_tokens
        assert r.object == "chat.completion" and r.model == model
    # Several turns: exactly the template's rendering, tokenized without extra specials.
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    r = client.chat.completions.create(model=model, max_tokens=8, temperature=0,
                                       messages=messages, extra_body={"return_token_ids": True})
    codec = world.rt.codec
    ids = codec.tok.encode(codec.render_chat(messages), add_special_tokens=False).ids
    assert r.prompt_token_ids == ids
    assert r.choices[0].token_ids == world.rt.generate(
        [ids], adapters=[adapter], max_new_tokens=8)[0].tokens
    # Text parts are joined as vLLM joins them.
    parts = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is"}, {"type": "text", "text": "2 + 2?"}]}])
    joined = client.chat.completions.create(
        model=model, max_tokens=8, temperature=0,
        messages=[{"role": "user", "content": "What is\n2 + 2?"}])
    assert parts.choices[0].message.content == joined.choices[0].message.content


@pytest.mark.parametrize("model", ["base", "a1"])
def test_streamed_chunks_concatenate_to_the_full_answer(client, model):
    for prompt in PROMPTS:
        full = complete(client, model, prompt, 20)
        chunks = list(client.completions.create(
            model=model, prompt=prompt, max_tokens=20, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        *body, usage = chunks
        details = "prompt_tokens_details"
        assert usage.choices == [] and usage.usage.model_dump(exclude={details}) == \
            full.usage.model_dump(exclude={details})
        # the same prompt again: its full blocks of 16 tokens come from the prefix cache
        cached = (full.usage.prompt_tokens - 1) // 16 * 16
        assert usage.usage.prompt_tokens_details.cached_tokens == cached
        assert "".join(c.choices[0].text for c in body) == full.choices[0].text
        assert [c.choices[0].finish_reason for c in body][-1] == full.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in body[:-1])
        assert len({c.id for c in chunks}) == 1

        messages = [{"role": "user", "content": prompt}]
        whole = client.chat.completions.create(model=model, messages=messages, max_tokens=20,
                                               temperature=0)
        stream = list(client.chat.completions.create(model=model, messages=messages,
                                                     max_tokens=20, temperature=0, stream=True))
        assert stream[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in stream)
        assert text == whole.choices[0].message.content
        assert stream[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_model_switches_per_request(world, client):
    prompt = PROMPTS[1]
    order = ["a2", "base", "a0", "a2", "a5", "base", "a0", "a5"]
    texts = [complete(client, m, prompt, 16).choices[0].token_ids for m in order]
    by_model = {}
    for m, t in zip(order, texts):
        assert by_model.setdefault(m, t) == t, m   # the same model always answers the same
    assert len({tuple(t) for t in by_model.values()}) == len(by_model)  # adapters differ
    for m, t in by_model.items():
        path = None if m == "base" else world.adapters[m]
        ids = world.rt.codec.tok.encode(prompt).ids
        assert t == reference_greedy(tiny_fn, path, ids, 16), m


def test_stop_strings_cut_the_text_and_are_reported(client):
    full = complete(client, "a0", PROMPTS[0], 24).choices[0]
    stop = full.text[5:7]
    assert len(stop) == 2
    r = complete(client, "a0", PROMPTS[0], 24, stop=[stop, "never-there"]).choices[0]
    assert r.text == full.text[:full.text.index(stop)]
    assert r.finish_reason == "stop" and r.stop_reason == stop
    streamed = client.completions.create(model="a0", prompt=PROMPTS[0], max_tokens=24,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.text


def test_seeded_sampling_is_reproducible_and_equals_generate(world, client):
    kw = dict(model="a2", prompt=PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.95,
              seed=1234)
    first = client.completions.create(**kw).choices[0].text
    assert client.completions.create(**kw).choices[0].text == first
    ref = world.rt.generate([PROMPTS[2]], adapters=["a2"], max_new_tokens=16, temperature=0.9,
                            top_p=0.95, seed=1234, chat=False)[0]
    assert first == ref.text
    top_k = client.completions.create(**kw, extra_body={"top_k": 5}).choices[0].text
    assert top_k == world.rt.generate([PROMPTS[2]], adapters=["a2"], max_new_tokens=16,
                                      temperature=0.9, top_p=0.95, top_k=5, seed=1234,
                                      chat=False)[0].text


def test_load_and_unload_change_models_and_routing(world, client):
    ids = lambda: [c.id for c in client.models.list().data]  # noqa: E731
    post = lambda path, body: httpx.post(world.main.url + path, json=body, timeout=30)  # noqa
    r = post("/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "x1.uora"})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'fresh' added successfully."
    r = post("/v1/load_lora_adapter", {"lora_name": "fresh-peft", "lora_path": "x0-peft"})
    assert r.status_code == 200, r.text
    r = post("/v1/load_lora_adapter", {"lora_name": "fresh-uora",
                                        "lora_path": str(world.dir / "x0.uora")})
    assert r.status_code == 200, r.text
    assert {"fresh", "fresh-peft", "fresh-uora"} <= set(ids())
    card = next(c for c in client.models.list().data if c.id == "fresh")
    assert card.parent == "base" and card.root == str((world.dir / "x1.uora").resolve())
    prompt = [1, 50, 51, 52, 53, 54]
    got = complete(client, "fresh", prompt, 12).choices[0].token_ids
    assert got == reference_greedy(tiny_fn, world.loadable["x1"], prompt, 12)
    # A PEFT VeRA folder, converted on load, serves what its .uora source serves.
    peft = complete(client, "fresh-peft", prompt, 12).choices[0].token_ids
    assert peft == complete(client, "fresh-uora", prompt, 12).choices[0].token_ids
    assert peft == reference_greedy(tiny_fn, world.loadable["x0"], prompt, 12)
    for name in ("fresh", "fresh-peft", "fresh-uora"):
        r = post("/v1/unload_lora_adapter", {"lora_name": name})
        assert r.status_code == 200 and r.text == f"Success: LoRA adapter '{name}' removed " \
                                                  "successfully."
    assert ids() == ["base", *sorted(world.adapters)]
    with pytest.raises(openai.NotFoundError) as e:
        complete(client, "fresh", prompt, 4)
    assert e.value.body["message"] == "The model `fresh` does not exist."
    # The name can be used again.
    assert post("/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "x0.uora"}) \
        .status_code == 200
    assert complete(client, "fresh", prompt, 12).choices[0].token_ids == peft
    assert post("/v1/unload_lora_adapter", {"lora_name": "fresh"}).status_code == 200


def test_health_version_and_metrics(world):
    assert httpx.get(world.main.url + "/health").status_code == 200
    assert httpx.get(world.main.url + "/version").json()["version"]
    m = world.main.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_blocks_used",
                 "kv_blocks_total", "generation_tokens_per_second"):
        assert f"uora_rt:{name}" in m, name
    assert m['uora_rt:requests_total{model="a0"}'] >= 1
    assert "uora_rt:time_to_first_token_seconds_count" in m
    assert "uora_rt:time_per_output_token_seconds_count" in m
