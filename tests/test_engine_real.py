"""The engine on SmolLM2-135M-Instruct real weights: a request trace against transformers + PEFT
VeRA one request at a time, and text (incremental detokenization, stop strings, streaming)."""

import pytest
import torch

import uora_rt
from conftest import requires_smollm2
from peft_ref import make_adapter, peft_vera_model
from uora_rt import Engine, SamplingParams

pytestmark = [pytest.mark.slow, requires_smollm2]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from transformers import LlamaForCausalLM

    from uora_rt.models.gguf_import import default_base

    folder = default_base("float32")
    fn = lambda: LlamaForCausalLM.from_pretrained(str(folder)).eval()  # noqa: E731
    tmp = tmp_path_factory.mktemp("smol")
    ads = {"a": make_adapter(fn, tmp / "a.uora", r=32, targets=("q_proj", "v_proj"), scale=0.3),
           "b": make_adapter(fn, tmp / "b.uora", r=32, seed=3, lam_seed=2, scale=0.3,
                             reinit=True, targets=("k_proj", "o_proj", "down_proj"))}
    return fn, uora_rt.load(folder, adapters=list(ads.items())), ads


def test_trace_equals_transformers_peft(smol):
    fn, rt, ads = smol
    prompts = ["What is the capital of France?", "Write a haiku about rain.",
               "List three colors.", "Explain gravity to a child in one sentence."]
    names = ["a", "b", None, "a"]
    engine = Engine(rt, kv_cache_tokens=1024, max_step_tokens=24)  # prompts arrive in chunks
    rids = [engine.add_request(prompts[0], names[0], SamplingParams(max_tokens=14))]
    engine.step()
    engine.step()
    rids += [engine.add_request(p, n, SamplingParams(max_tokens=14))
             for p, n in zip(prompts[1:], names[1:])]
    done = engine.run_until_done()
    eos = rt.codec.eos_id
    for p, n, rid in zip(prompts, names, rids):
        ids = rt.codec.encode_prompt(p)
        model = fn() if n is None else peft_vera_model(fn(), ads[n])
        t = torch.tensor([ids])
        ref = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=14,
                             do_sample=False)[0, len(ids):].tolist()
        ref = ref[:ref.index(eos)] if eos in ref else ref
        assert done[rid].token_ids == ref, n
        assert done[rid].text == rt.codec.decode(ref)


def test_text_stop_strings_and_streaming(smol):
    fn, rt, _ = smol
    prompt = "Tell me a short story about a cat."
    engine = Engine(rt, kv_cache_tokens=1024)
    rid = engine.add_request(prompt, None, SamplingParams(max_tokens=40))
    free = engine.run_until_done()[rid]
    assert free.text == rt.codec.decode(free.token_ids)
    words = free.text.split()
    stop = " ".join(words[3:5])  # a stop string made of two words in the middle
    cut = free.text.index(stop)
    pieces = []
    rid = engine.add_request(prompt, None, SamplingParams(max_tokens=40, stop=["@@never", stop]),
                             on_output=pieces.append)
    out = engine.run_until_done()[rid]
    assert out.finish_reason == "stop" and out.text == free.text[:cut]
    assert "".join(p.new_text for p in pieces) == out.text
    assert out.token_ids == free.token_ids[:len(out.token_ids)]
    # every streamed prefix is a prefix of the final (cut) text: no half stop string went out
    text_so_far = ""
    for p in pieces:
        text_so_far += p.new_text
        assert out.text.startswith(text_so_far)
