"""The serving runtime on tiny transformers models: mixed batches equal PEFT VeRA per sequence."""

import threading

import pytest
import torch

import uora_rt
from conftest import MODEL_TOL, assert_close
from models_tiny import tiny_bert, tiny_llama, tiny_qwen2
from peft_ref import make_adapter, peft_vera_model
from uora_rt.errors import AdapterFormatError
from uora_rt.kernels import ops

LLAMA_VARIANTS = {
    "llama_gqa_untied": lambda: tiny_llama(),
    "llama_mha_tied": lambda: tiny_llama(num_key_value_heads=4, tie_word_embeddings=True),
    "qwen2_bias_tied": lambda: tiny_qwen2(),
    "llama_rope_params": lambda: tiny_llama(rope_parameters={"rope_type": "default",
                                                             "rope_theta": 500.0}),
}


def save_base(model_fn, folder):
    model_fn().save_pretrained(folder)
    return folder


def reference_logits(model_fn, adapter, ids):
    model = model_fn() if adapter is None else peft_vera_model(model_fn(), adapter)
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_decoder_mixed_batch_equals_peft_per_sequence(variant, tmp_path):
    fn = LLAMA_VARIANTS[variant]
    base = save_base(fn, tmp_path / "base")
    ads = {
        "qv": make_adapter(fn, tmp_path / "qv.uora", targets=("q_proj", "v_proj"), lam_seed=1),
        "qkv_reinit": make_adapter(fn, tmp_path / "qkvr.uora",
                                   targets=("q_proj", "k_proj", "v_proj"), lam_seed=2, reinit=True),
        "mlp_other_seed": make_adapter(fn, tmp_path / "mlp.uora", seed=5, lam_seed=3,
                                       targets=("gate_proj", "up_proj", "down_proj", "o_proj")),
    }
    rt = uora_rt.load(base, adapters=[(n, p) for n, p in ads.items()])
    g = torch.Generator().manual_seed(0)
    lengths = [9, 5, 12, 7, 3]
    names = ["qv", "qkv_reinit", None, "mlp_other_seed", "qv"]
    seqs = [torch.randint(0, 97, (n,), generator=g) for n in lengths]
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):  # rows 0-2 left-padded, rows 3-4 right-padded
        cols = slice(width - len(s), width) if i < 3 else slice(0, len(s))
        ids[i, cols], mask[i, cols] = s, 1
    out = rt.forward(ids, mask, names).logits
    for i, (s, n) in enumerate(zip(seqs, names)):
        want = reference_logits(fn, ads.get(n), s)
        assert_close(out[i][mask[i].bool()], want, table=MODEL_TOL, msg=f"row {i} ({n})")


def test_greedy_generation_equals_peft(tmp_path):
    fn = LLAMA_VARIANTS["llama_gqa_untied"]
    base = save_base(fn, tmp_path / "base")
    a = make_adapter(fn, tmp_path / "a.uora", lam_seed=4, scale=1.0)
    b = make_adapter(fn, tmp_path / "b.uora", targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                     lam_seed=5, scale=1.0, reinit=True)
    rt = uora_rt.load(base, adapters=[("a", a), ("b", b)])
    prompts = [[3, 14, 15, 92, 65], [27, 18], [1, 2, 3, 4, 5, 6, 7, 8], [42]]
    names = ["a", None, "b", "a"]
    got = rt.generate(prompts, adapters=names, max_new_tokens=12)
    for p, n, g in zip(prompts, names, got):
        model = fn() if n is None else peft_vera_model(fn(), {"a": a, "b": b}[n])
        want = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                               attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert g.tokens == want[0, len(p):].tolist(), n
        assert g.finish_reason == "length" and g.adapter == n


def test_encoder_mixed_batch_equals_peft(tmp_path):
    fn = tiny_bert
    base = save_base(fn, tmp_path / "base")
    a = make_adapter(fn, tmp_path / "a.uora", targets=("query", "value"))
    b = make_adapter(fn, tmp_path / "b.uora",
                     targets=("key", "attention.output.dense", "intermediate.dense",
                              "output.dense"),
                     reinit=True, lam_seed=7)
    rt = uora_rt.load(base, adapters=[("a", a), ("b", b)])
    ids = torch.randint(0, 97, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    names = ["b", "a", None]
    out = rt.forward(ids, mask, names)
    for i, n in enumerate(names):
        model = fn() if n is None else peft_vera_model(fn(), {"a": a, "b": b}[n])
        with torch.no_grad():
            ref = model(ids[i:i + 1], attention_mask=mask[i:i + 1])
        keep = mask[i].bool()
        assert_close(out.hidden_states[i][keep], ref.last_hidden_state[0][keep], table=MODEL_TOL)
        assert_close(out.pooled[i], ref.pooler_output[0], table=MODEL_TOL)


def test_add_remove_between_and_during_batches(tmp_path):
    fn = LLAMA_VARIANTS["llama_gqa_untied"]
    base = save_base(fn, tmp_path / "base")
    paths = [make_adapter(fn, tmp_path / f"a{i}.uora", lam_seed=10 + i) for i in range(6)]
    rt = uora_rt.load(base, adapters=[("a0", paths[0])])
    ids = torch.randint(0, 97, (1, 8))
    want0 = rt.forward(ids, adapters=["a0"]).logits
    for i in range(1, 6):  # slots grow past the initial capacity; a0 is never disturbed
        rt.add_adapter(paths[i], name=f"a{i}")
        assert torch.equal(rt.forward(ids, adapters=["a0"]).logits, want0)
    want3 = rt.forward(ids, adapters=["a3"]).logits[0]
    rt.remove_adapter("a3")
    rt.add_adapter(paths[3], name="again")  # reuses a3's freed slot
    assert rt.adapters == ["a0", "a1", "a2", "a4", "a5", "again"]
    batch = rt.forward(ids.expand(6, -1), adapters=rt.adapters).logits
    solo = {n: rt.forward(ids, adapters=[n]).logits[0] for n in rt.adapters}
    for row, n in enumerate(rt.adapters):
        assert_close(batch[row], solo[n], table=MODEL_TOL)
    assert torch.equal(solo["again"], want3)
    with pytest.raises(KeyError, match="a3"):
        rt.forward(ids, adapters=["a3"])

    # During a request: generation of a1 runs in a thread while adapters come and go.
    gen_started, mutated, results = threading.Event(), threading.Event(), {}
    expected = rt.generate([[5, 6, 7]], adapters=["a1"], max_new_tokens=20)[0].tokens
    orig_forward = rt.model.forward

    def slow_forward(*a, **k):  # the prefill waits until the pool has been changed under it
        gen_started.set()
        mutated.wait(10)
        return orig_forward(*a, **k)

    rt.model.forward = slow_forward
    try:
        t = threading.Thread(target=lambda: results.setdefault(
            "g", rt.generate([[5, 6, 7]], adapters=["a1"], max_new_tokens=20)))
        t.start()
        gen_started.wait(10)
        rt.remove_adapter("a1")
        rt.add_adapter(paths[2], name="new")  # must not take a1's slot while a1 is in flight
        mutated.set()
        t.join(30)
    finally:
        rt.model.forward = orig_forward
    assert results["g"][0].tokens == expected


def test_bad_inputs(tmp_path):
    fn = LLAMA_VARIANTS["llama_gqa_untied"]
    base = save_base(fn, tmp_path / "base")
    rt = uora_rt.load(base)
    ids = torch.randint(0, 97, (2, 5))
    with pytest.raises(KeyError, match="unknown adapter"):
        rt.forward(ids, adapters=["nope", None])
    with pytest.raises(ValueError, match="expected 2 entries"):
        rt.forward(ids, adapters=[None])
    # an adapter trained for another base (hidden 32) is refused, and nothing else is disturbed
    other = make_adapter(lambda: tiny_llama(hidden_size=32, intermediate_size=48),
                         tmp_path / "o.uora")
    good = make_adapter(fn, tmp_path / "g.uora")
    rt.add_adapter(good, name="good")
    before = rt.forward(ids, adapters=["good", None]).logits
    with pytest.raises(AdapterFormatError, match=r"base model's \[out, in\] = \[64, 64\]"):
        rt.add_adapter(other, name="other")
    with pytest.raises(AdapterFormatError, match="no such module"):
        bert_adapter = make_adapter(tiny_bert, tmp_path / "b.uora", targets=("query",))
        rt.add_adapter(bert_adapter)
    assert rt.adapters == ["good"]
    assert torch.equal(rt.forward(ids, adapters=["good", None]).logits, before)
    # unknown architecture, missing shard
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(
        '{"architectures": ["T5Model"], "model_type": "t5"}')
    (tmp_path / "weird" / "model.safetensors").write_bytes(
        (base / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="unsupported architecture"):
        uora_rt.load(tmp_path / "weird")
    sharded = tmp_path / "sharded"
    fn().save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert_close(uora_rt.load(sharded).forward(ids).logits, rt.forward(ids).logits, table=MODEL_TOL)
    shards[1].unlink()
    with pytest.raises(ValueError, match="is missing"):
        uora_rt.load(sharded)


def test_merge_serves_one_adapter_with_zero_overhead(tmp_path):
    fn = LLAMA_VARIANTS["qwen2_bias_tied"]
    base = save_base(fn, tmp_path / "base")
    a = make_adapter(fn, tmp_path / "a.uora", targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                     reinit=True)
    rt = uora_rt.load(base, adapters=[("a", a)])
    ids = torch.randint(0, 97, (2, 7))
    unmerged = rt.forward(ids, adapters=["a", "a"]).logits
    base_out = rt.forward(ids).logits
    rt.merge("a")
    assert_close(rt.forward(ids, adapters=["a", "a"]).logits, unmerged, table=MODEL_TOL)
    with pytest.raises(ValueError, match="merged with 'a'"):
        rt.forward(ids, adapters=[None, "a"])
    rt.unmerge()
    assert_close(rt.forward(ids).logits, base_out, table=MODEL_TOL)


def test_bfloat16_runtime_close_to_float32_peft(tmp_path):
    fn = LLAMA_VARIANTS["llama_gqa_untied"]
    base = save_base(fn, tmp_path / "base")
    a = make_adapter(fn, tmp_path / "a.uora", reinit=True)
    rt = uora_rt.load(base, adapters=[("a", a)], dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (1, 9))
    got = rt.forward(ids, adapters=["a"]).logits[0]
    model = peft_vera_model(fn().to(torch.bfloat16), a)
    with torch.no_grad():
        want = model(ids).logits[0].float()
    assert_close(got, want, dtype=torch.bfloat16, table=MODEL_TOL)


def test_parallel_shrink_path_equals_uora_group(tmp_path, monkeypatch):
    # The GPU's route (each family's shrink as its own GEMM over every row, then uora_expand_)
    # run on the CPU (without the side stream), against uora_group_'s.
    fn = LLAMA_VARIANTS["qwen2_bias_tied"]
    base = save_base(fn, tmp_path / "base")
    a = make_adapter(fn, tmp_path / "a.uora", targets=("q_proj", "v_proj", "down_proj"),
                     reinit=True)
    b = make_adapter(fn, tmp_path / "b.uora", seed=4, targets=("k_proj", "o_proj"))
    c = make_adapter(fn, tmp_path / "c.uora", lam_seed=8)
    adapters = [("a", a), ("b", b), ("c", c)]
    plain = uora_rt.load(base, adapters=adapters, parallel_shrink=False)
    fused = uora_rt.load(base, adapters=adapters, parallel_shrink=True)
    ids = torch.randint(0, 97, (5, 8))
    for names in (["a", "b", None, "c", "a"], ["c", "c", "c", "c", "c"],
                  ["b", None, "b", "a", "c"]):
        assert_close(fused.forward(ids, adapters=names).logits,
                     plain.forward(ids, adapters=names).logits, table=MODEL_TOL)
    calls, expand = [], ops.uora_expand_
    monkeypatch.setattr(ops, "uora_expand_", lambda *a: (calls.append(1), expand(*a)))
    fused.forward(ids[:2], adapters=["a", "b"])
    assert calls  # the split route really ran
    assert fused.generate([[1, 2, 3]], adapters=["a"], max_new_tokens=6)[0].tokens == \
        plain.generate([[1, 2, 3]], adapters=["a"], max_new_tokens=6)[0].tokens
