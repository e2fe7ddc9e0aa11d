"""The OpenAI fields through the official openai client against the real server process:
logprobs (chat and completions, echo with prompt logprobs) equal log_softmax of transformers'
logits (+ PEFT VeRA, also for a PEFT folder converted on load); n choices each equal the request
alone with seed + i; best_of keeps the best mean logprob; penalties, logit_bias, min_tokens and
stop_token_ids equal transformers or an independent greedy loop; /tokenize and /detokenize."""

import httpx
import pytest
import torch
from conftest import MODEL_TOL
from peft_ref import peft_vera_model
from server_helpers import CHARS, openai_client, tiny_fn, tiny_world

ATOL, RTOL = MODEL_TOL[torch.float32]


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return tiny_world(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def client(world):
    return openai_client(world)


def model_for(world, name):
    if name == "base":
        return tiny_fn()
    if name == "peft-x0":
        from peft import PeftModel

        return PeftModel.from_pretrained(tiny_fn(), str(world.dir / "x0-peft")).eval()
    return peft_vera_model(tiny_fn(), world.adapters[name])


def log_softmax(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)


def close(a, b):
    return abs(a - b) <= ATOL + RTOL * abs(b)


def text_of(tid):
    return {0: "<unk>", 1: "<s>", 2: "</s>"}.get(tid) or CHARS[tid - 3]


def tid_of(text):
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return special[text] if text in special else CHARS.index(text) + 3


@pytest.mark.parametrize("name", ["base", "a1", "peft-x0"])
def test_completion_logprobs_and_echo_equal_transformers(world, client, name):
    if name == "peft-x0":  # a PEFT VeRA folder, converted as it is loaded
        r = httpx.post(world.main.url + "/v1/load_lora_adapter",
                       json={"lora_name": "peft-x0", "lora_path": "x0-peft"}, timeout=60)
        assert r.status_code == 200, r.text
    try:
        prompt = "Hello there"
        r = client.completions.create(model=name, prompt=prompt, max_tokens=6, temperature=0.8,
                                      seed=3, logprobs=3, echo=True,
                                      extra_body={"return_token_ids": True})
        c = r.choices[0]
        ids = c.prompt_token_ids + c.token_ids
        ref = log_softmax(model_for(world, name), ids)
        lp = c.logprobs
        n_prompt = len(c.prompt_token_ids)
        assert c.text.startswith(prompt) and lp.tokens[0] == "<s>"
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) >= len(ids)  # + "</s>" when EOS ended it
        for j in range(1, len(ids)):
            tid = ids[j]
            assert lp.tokens[j] == text_of(tid)
            assert close(lp.token_logprobs[j], ref[j - 1, tid].item())
            top = lp.top_logprobs[j]
            want = ref[j - 1].topk(3)
            assert set(top) >= {text_of(t) for t in want.indices.tolist()}
            assert len(top) in (3, 4) and text_of(tid) in top
            for text, v in top.items():
                assert close(v, ref[j - 1, tid_of(text)].item())
        assert lp.text_offset[:3] == [0, 3, 4]  # "<s>" then "H"
        assert n_prompt == len(prompt) + 1
    finally:
        if name == "peft-x0":
            httpx.post(world.main.url + "/v1/unload_lora_adapter", json={"lora_name": name})


def test_chat_logprobs_and_top_logprobs_equal_transformers(world, client):
    r = client.chat.completions.create(
        model="a2", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    c = r.choices[0]
    ids = r.prompt_token_ids + c.token_ids
    ref = log_softmax(model_for(world, "a2"), ids)
    content = c.logprobs.content
    for i, tid in enumerate(c.token_ids):
        row = ref[len(r.prompt_token_ids) + i - 1]
        e = content[i]
        assert e.token == text_of(tid) and e.bytes == list(text_of(tid).encode())
        assert close(e.logprob, row[tid].item())
        want = row.topk(2)
        assert [t.token for t in e.top_logprobs] == [text_of(t) for t in want.indices.tolist()]
        assert all(close(t.logprob, v) for t, v in zip(e.top_logprobs, want.values.tolist()))
    assert content[0].logprob == max(t.logprob for t in content[0].top_logprobs)  # greedy


def test_n_choices_equal_each_seed_alone_and_best_of_keeps_the_best(world, client):
    kw = dict(model="a3", prompt="The quick brown fox", max_tokens=8, temperature=1.0)
    r = client.completions.create(n=3, seed=40, **kw, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    alone = [client.completions.create(seed=40 + i, **kw, extra_body={"ignore_eos": True})
             .choices[0].text for i in range(3)]
    assert [c.text for c in r.choices] == alone
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == 20
    chat = client.chat.completions.create(model="a3", messages=[{"role": "user",
                                                                 "content": "hey"}],
                                          n=2, seed=5, max_tokens=6, temperature=1.0)
    for i, c in enumerate(chat.choices):
        one = client.chat.completions.create(model="a3", messages=[{"role": "user",
                                                                    "content": "hey"}],
                                             seed=5 + i, max_tokens=6, temperature=1.0)
        assert c.index == i and c.message.content == one.choices[0].message.content
    # best_of 4 -> the 2 with the highest mean logprob, in seed order
    best = client.completions.create(n=2, best_of=4, seed=40, logprobs=0, **kw)
    scored = []
    for i in range(4):
        one = client.completions.create(seed=40 + i, logprobs=0, **kw).choices[0]
        scored.append((sum(one.logprobs.token_logprobs) / len(one.logprobs.token_logprobs),
                       one.text))
    keep = sorted(range(4), key=lambda i: -scored[i][0])[:2]
    assert [c.text for c in best.choices] == [scored[i][1] for i in sorted(keep)]
    assert best.usage.completion_tokens >= 4 * 1


def test_batch_prompts_with_n_index_choices_prompt_major(client):
    r = client.completions.create(model="base", prompt=["ab", "cd"], n=2, max_tokens=3,
                                  temperature=1.0, seed=9)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="base", prompt="cd", max_tokens=3, temperature=1.0,
                                      seed=10)
    assert r.choices[3].text == again.choices[0].text


def greedy_with_penalties(model, ids, n, freq, pres):
    """OpenAI's documented formula applied to transformers' logits, greedy, one step at a time."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            x = model(torch.tensor([ids + out])).logits[0, -1].double()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.shape[0])
        x = x - freq * counts - pres * (counts > 0)
        tok = int(x.argmax())
        if tok == 2:
            break
        out.append(tok)
    return out


def test_penalties_and_logit_bias_equal_their_references(world, client):
    prompt = "aaaa bbbb aaaa"
    base_kw = dict(prompt=prompt, max_tokens=10, temperature=0,
                   extra_body={"return_token_ids": True})
    m = model_for(world, "a0")
    plain = client.completions.create(model="a0", **base_kw).choices[0]
    ids = plain.prompt_token_ids
    for freq, pres in ((1.5, 0.0), (0.0, 1.2), (-0.5, 0.7)):
        c = client.completions.create(model="a0", frequency_penalty=freq, presence_penalty=pres,
                                      **base_kw).choices[0]
        assert c.token_ids == greedy_with_penalties(m, ids, 10, freq, pres), (freq, pres)
    r = client.completions.create(model="a0", **{**base_kw, "extra_body": {
        "return_token_ids": True, "repetition_penalty": 1.7}}).choices[0]
    gen = m.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False,
                     repetition_penalty=1.7, pad_token_id=0)[0, len(ids):].tolist()
    assert r.token_ids == (gen[:gen.index(2)] if 2 in gen else gen)
    bias = {str(tid_of("z")): 8.0, str(tid_of("a")): -5.0}
    r = client.completions.create(model="a0", logit_bias=bias, **base_kw).choices[0]
    gen = m.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=0,
                     sequence_bias={(int(t),): v for t, v in bias.items()})[0, len(ids):].tolist()
    assert r.token_ids == (gen[:gen.index(2)] if 2 in gen else gen)


def test_min_tokens_and_stop_token_ids(client):
    eos_bias = {"2": 100.0}
    for m in (0, 3, 7):
        c = client.completions.create(model="base", prompt="x", max_tokens=10, temperature=0.5,
                                      seed=1, logit_bias=eos_bias,
                                      extra_body={"min_tokens": m, "return_token_ids": True})
        c = c.choices[0]
        assert len(c.token_ids) == m and c.finish_reason == "stop" and c.stop_reason is None
    q = str(tid_of("q"))
    c = client.completions.create(model="base", prompt="x", max_tokens=10, temperature=0,
                                  logit_bias={q: 100.0},
                                  extra_body={"stop_token_ids": [int(q)], "min_tokens": 2})
    c = c.choices[0]
    assert c.finish_reason == "stop" and c.stop_reason == int(q) and len(c.text) == 2
    assert "q" not in c.text


def test_streamed_choices_and_logprobs_equal_the_whole_answer(client):
    kw = dict(model="a1", prompt="Stream me", max_tokens=7, temperature=1.0, seed=2, n=2,
              logprobs=2)
    whole = client.completions.create(**kw)
    texts, lps = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.logprobs is not None:
                lps[c.index] += c.logprobs.token_logprobs
    for c in whole.choices:
        assert texts[c.index] == c.text and lps[c.index] == c.logprobs.token_logprobs
    chat_kw = dict(model="a1", messages=[{"role": "user", "content": "yo"}], max_tokens=5,
                   temperature=1.0, seed=4, n=2, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**chat_kw)
    got = {0: [], 1: []}
    for chunk in client.chat.completions.create(stream=True, **chat_kw):
        for c in chunk.choices:
            if c.logprobs is not None and c.logprobs.content:
                got[c.index] += [(e.token, e.logprob) for e in c.logprobs.content]
    for c in whole.choices:
        assert got[c.index] == [(e.token, e.logprob) for e in c.logprobs.content]


def test_tokenize_and_detokenize(world):
    url = world.main.url
    r = httpx.post(url + "/tokenize", json={"model": "a0", "prompt": "hi!",
                                            "return_token_strs": True}).json()
    assert r == {"count": 4, "max_model_len": 512, "tokens": [1, tid_of("h"), tid_of("i"),
                                                              tid_of("!")],
                 "token_strs": ["<s>", "h", "i", "!"]}
    r = httpx.post(url + "/tokenize", json={"prompt": "hi", "add_special_tokens": False}).json()
    assert r["tokens"] == [tid_of("h"), tid_of("i")] and r["token_strs"] is None
    r = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    want = world.rt.codec.tok.encode("<s>user: hi\n<s>assistant: ",
                                     add_special_tokens=False).ids
    assert r.json()["tokens"] == want
    r = httpx.post(url + "/detokenize", json={"tokens": [1, tid_of("o"), tid_of("k")]})
    assert r.json() == {"prompt": "ok"}
    for path, body, param in (("/detokenize", {"tokens": [1, 500]}, "tokens"),
                              ("/tokenize", {"prompt": "x", "messages": [
                                  {"role": "user", "content": "x"}]}, "prompt"),
                              ("/tokenize", {"model": "nope", "prompt": "x"}, "model")):
        r = httpx.post(url + path, json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param
