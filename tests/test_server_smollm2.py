"""`uora-rt serve` on SmolLM2-135M-Instruct (real weights, real tokenizer and chat template)
through the openai client: answers equal rt.generate for the same prompt and adapter, streamed
text equals the whole answer, and concurrent requests on different adapters stay separate."""

import asyncio

import openai
import pytest

import uora_rt
from conftest import requires_smollm2
from peft_ref import make_adapter
from server_helpers import Server

pytestmark = [pytest.mark.slow, requires_smollm2]
PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]


BASE = "SmolLM2-135M-Instruct"
COMPLETION = "The three primary colors are"
N = 12


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(server, references): the server, and rt.generate's answers for every request the
    tests send, computed in this process in one batch while the server starts."""
    from transformers import LlamaForCausalLM

    from uora_rt.models.gguf_import import default_base

    folder = default_base("float32")
    fn = lambda: LlamaForCausalLM.from_pretrained(str(folder)).eval()  # noqa: E731
    tmp = tmp_path_factory.mktemp("smol-server")
    # Strong enough that "terse" changes these answers (at 0.3 neither does).
    ads = {"pirate": make_adapter(fn, tmp / "p.uora", r=32, scale=2.0),
           "terse": make_adapter(fn, tmp / "t.uora", r=32, seed=3, lam_seed=2, scale=1.5,
                                 reinit=True, targets=("k_proj", "o_proj", "down_proj"))}
    server = Server(["smollm2", *(f"--adapter={n}={p}" for n, p in ads.items()),
                     "--max-step-tokens", "128"], tmp / "server.log", threads=2, wait=False)
    try:
        rt = uora_rt.load(folder, adapters=list(ads.items()))
        rows = [("chat", PROMPTS[1], None), ("chat", PROMPTS[1], "pirate"),
                ("chat", PROMPTS[1], "terse"), ("chat", PROMPTS[0], "terse"),
                ("text", COMPLETION, "pirate")]
        prompts = [p if kind == "chat" else rt.codec.tok.encode(p).ids for kind, p, _ in rows]
        outs = rt.generate(prompts, adapters=[a for *_, a in rows], max_new_tokens=N)
        refs = {(kind, p, a or BASE): o for (kind, p, a), o in zip(rows, outs)}
        server.wait(timeout=180)
    except Exception:
        server.stop()
        raise
    yield server, refs
    server.stop()


@pytest.fixture(scope="module")
def client(smol):
    return openai.OpenAI(base_url=smol[0].url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_models_name_the_packaged_base(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [BASE, "pirate", "terse"]


def test_chat_equals_generate(smol, client):
    _, refs = smol
    for model in (BASE, "pirate", "terse"):
        ref = refs["chat", PROMPTS[1], model]
        r = client.chat.completions.create(model=model, max_tokens=N, temperature=0,
                                           messages=[{"role": "user", "content": PROMPTS[1]}])
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == ref.prompt_tokens
        eos = ref.finish_reason == "stop"
        assert r.usage.completion_tokens == len(ref.tokens) + eos


def test_completion_and_chat_streams(smol, client):
    _, refs = smol
    chunks = client.completions.create(model="pirate", prompt=COMPLETION, max_tokens=N,
                                       temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == refs["text", COMPLETION, "pirate"].text
    chat = list(client.chat.completions.create(
        model="terse", max_tokens=N, temperature=0, stream=True,
        messages=[{"role": "user", "content": PROMPTS[0]}],
        stream_options={"include_usage": True}))
    ref = refs["chat", PROMPTS[0], "terse"]
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == ref.text
    assert chat[-1].usage.completion_tokens == len(ref.tokens) + (ref.finish_reason == "stop")


def test_concurrent_requests_keep_their_adapters(smol):
    server, refs = smol
    models = ["terse", BASE, "pirate", "terse"]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                    timeout=120)
        rs = await asyncio.gather(*[client.chat.completions.create(
            model=m, max_tokens=N, temperature=0,
            messages=[{"role": "user", "content": PROMPTS[1]}]) for m in models])
        await client.close()
        return [r.choices[0].message.content for r in rs]

    got = asyncio.run(main())
    assert got == [refs["chat", PROMPTS[1], m].text for m in models]
    assert got[0] != got[1]  # a request served with the wrong adapter would show
