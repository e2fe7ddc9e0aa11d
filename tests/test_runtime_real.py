"""The runtime on real checkpoints: SmolLM2-135M-Instruct and all-MiniLM-L6-v2 against
transformers + PEFT VeRA, one adapter at a time, while we serve them all in one mixed batch."""

import pytest
import torch

import uora_rt
from conftest import MODEL_TOL, assert_close, requires_minilm, requires_smollm2
from peft_ref import make_adapter, peft_vera_model
from uora_rt.models import assets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from uora_rt.models.gguf_import import default_base

    return default_base("float32")


def hf_llama(folder):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder)).eval()


@requires_smollm2
def test_smollm2_mixed_batch_and_greedy_equal_peft(smollm2, tmp_path):
    fn = lambda: hf_llama(smollm2)  # noqa: E731
    a = make_adapter(fn, tmp_path / "a.uora", r=32, targets=("q_proj", "v_proj"), scale=0.3)
    b = make_adapter(fn, tmp_path / "b.uora", r=32, seed=3, lam_seed=2, scale=0.3, reinit=True,
                     targets=("k_proj", "o_proj", "down_proj"))
    rt = uora_rt.load(smollm2, adapters=[("a", a), ("b", b)])
    prompts = ["What is the capital of France?", "Write a haiku about rain.",
               "List three colors."]
    names = ["a", "b", None]
    encoded = [rt.codec.encode_prompt(p) for p in prompts]
    width = max(len(e) for e in encoded)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):], mask[i, width - len(e):] = torch.tensor(e), 1
    logits = rt.forward(ids, mask, names).logits
    gens = rt.generate(prompts, adapters=names, max_new_tokens=16)
    for i, (e, n) in enumerate(zip(encoded, names)):
        model = fn() if n is None else peft_vera_model(fn(), {"a": a, "b": b}[n])
        with torch.no_grad():
            want = model(torch.tensor([e])).logits[0]
        assert_close(logits[i, width - len(e):], want, table=MODEL_TOL, msg=f"{n}")
        out = model.generate(torch.tensor([e]),
                             attention_mask=torch.ones(1, len(e), dtype=torch.long),
                             max_new_tokens=16, do_sample=False)[0, len(e):].tolist()
        eos = rt.codec.eos_id
        assert gens[i].tokens == [t for t in out if t != eos][: len(gens[i].tokens)]
        assert (len(gens[i].tokens) == len([t for t in out if t != eos])
                or gens[i].finish_reason == "stop")


@requires_minilm
def test_minilm_mixed_batch_equals_peft_with_declared_pooling(tmp_path):
    from transformers import BertModel

    folder = assets.minilm_dir()
    def fn():
        return BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    a = make_adapter(fn, tmp_path / "a.uora", r=32, targets=("query", "value"), scale=0.3)
    b = make_adapter(fn, tmp_path / "b.uora", r=32, lam_seed=9, scale=0.3, reinit=True,
                     targets=("key", "intermediate.dense"))
    rt = uora_rt.load("minilm", adapters=[("a", a), ("b", b)])
    enc = rt.codec.tok.encode_batch(["the chef baked bread",
                                     "rain is coming tonight, said the forecast", "goal!"])
    width = max(len(e.ids) for e in enc)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)], mask[i, : len(e.ids)] = torch.tensor(e.ids), 1
    names = ["b", None, "a"]
    out = rt.forward(ids, mask, names)
    for i, n in enumerate(names):
        model = fn() if n is None else peft_vera_model(fn(), {"a": a, "b": b}[n])
        with torch.no_grad():
            h = model(ids[i:i + 1], attention_mask=mask[i:i + 1]).last_hidden_state[0]
        keep = mask[i].bool()
        assert_close(out.hidden_states[i][keep], h[keep], table=MODEL_TOL)
        mean = h[keep].mean(0)  # the checkpoint declares mean pooling + Normalize
        assert_close(out.pooled[i], torch.nn.functional.normalize(mean, dim=0), table=MODEL_TOL)
