"""Shared pieces of the engine tests: tiny bases with adapters, the PEFT reference, leak checks."""

import torch

import uora_rt
from models_tiny import tiny_llama, tiny_qwen2
from peft_ref import make_adapter, peft_vera_model

BASES = {
    "llama": lambda: tiny_llama(num_hidden_layers=2, max_position_embeddings=256),
    "qwen2": lambda: tiny_qwen2(max_position_embeddings=256),
    # Multi-head attention with every bias (the row-parallel o/down biases are added once).
    "llama_mha": lambda: tiny_llama(num_hidden_layers=2, max_position_embeddings=256,
                                    num_key_value_heads=4, attention_bias=True, mlp_bias=True),
}


def build(tmp_path, kind="llama", n_adapters=3):
    """A saved tiny base and adapters of two projection families (one with reinit events)."""
    fn = BASES[kind]
    fn().save_pretrained(tmp_path / "base")
    specs = [dict(targets=("q_proj", "v_proj"), lam_seed=1, scale=1.0),
             dict(targets=("q_proj", "k_proj", "v_proj", "down_proj"), lam_seed=2, scale=1.0,
                  reinit=True),
             dict(targets=("gate_proj", "up_proj", "o_proj"), seed=5, lam_seed=3, scale=1.0)]
    ads = {}
    for i in range(n_adapters):
        spec = dict(specs[i % len(specs)])
        spec["lam_seed"] = spec["lam_seed"] + 10 * (i // len(specs))
        ads[f"a{i}"] = make_adapter(fn, tmp_path / f"a{i}.uora", **spec)
    return fn, tmp_path / "base", ads


def reference_greedy(fn, adapter_path, prompt, n, with_reason=False):
    """transformers (+ PEFT VeRA carrying the adapter) greedy generate, one request alone: the
    tokens before the end-of-sequence token (which the engine does not report either)."""
    model = fn() if adapter_path is None else peft_vera_model(fn(), adapter_path)
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    eos = model.config.eos_token_id
    tokens = out[:out.index(eos)] if eos in out else out
    return (tokens, "stop" if eos in out else "length") if with_reason else tokens


def assert_idle(engine):
    """Nothing leaked: every KV block free, no adapter slot pinned, no request in flight."""
    assert not engine.has_unfinished()
    assert engine.allocator.num_free == engine.allocator.capacity
    assert engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0
    pool = engine.adapters
    assert all(n == 0 for f in pool.families.values() for n in f.pins)
    assert all(e.refs == 0 for e in pool.entries.values())
    assert pool.in_flight == 0


def random_prompts(n, vocab=97, lo=1, hi=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]


def load(base, ads, **kw):
    return uora_rt.load(base, adapters=list(ads.items()), **kw)
