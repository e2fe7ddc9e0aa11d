"""Training side: inject, forward, freezing, merge/unmerge, save/load, state_dict, dtypes."""

import copy

import pytest
import torch
from torch import nn

import uora_rt
from conftest import assert_close
from models_tiny import randomize_lambdas, tiny_bert, tiny_gpt2, tiny_llama
from uora_rt.kernels import reference
from uora_rt.training.inject import adapter_layers, shared_state


def layer_inputs(model, x_fn):
    """Runs the model once, capturing each adapted layer's input and output."""
    seen = {}
    hooks = [layer.register_forward_hook(lambda m, i, o, n=name: seen.__setitem__(n, (i[0], o)))
             for name, layer in adapter_layers(model)]
    with torch.no_grad():
        x_fn()
    for h in hooks:
        h.remove()
    return seen


def check_layers_against_reference(model, x_fn):
    shared = shared_state(model)
    for name, (x, y) in layer_inputs(model, x_fn).items():
        layer = dict(adapter_layers(model))[name]
        w = layer.base_layer.weight
        w = w.T if layer.conv1d else w
        want = reference.uora_linear(x, w, layer.base_layer.bias, shared.A, shared.B,
                                     layer.lambda_b, layer.lambda_d)
        assert_close(y, want, msg=name)


def test_sequential_forward_matches_reference():
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 12))
    uora_rt.inject(model, uora_rt.UORAConfig(r=8, target_modules=["0", "2"]))
    randomize_lambdas(model)
    x = torch.randn(5, 16)
    check_layers_against_reference(model, lambda: model(x))


def test_llama_defaults_and_only_lambdas_train():
    model = tiny_llama()
    base_out = model(torch.arange(10)[None]).logits
    uora_rt.inject(model, uora_rt.UORAConfig(r=16))
    names = [n for n, _ in adapter_layers(model)]
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(n.endswith(("lambda_b", "lambda_d")) for n in trainable) and len(trainable) == 8
    # lambda_b starts at 0: a fresh adapter is an exact no-op.
    assert torch.equal(model(torch.arange(10)[None]).logits, base_out)
    shared = shared_state(model)
    assert shared.spec.max_in == 64 and shared.spec.max_out == 64
    randomize_lambdas(model, scale=0.5)
    check_layers_against_reference(model, lambda: model(torch.arange(10)[None]))


def test_gpt2_conv1d():
    model = tiny_gpt2()
    uora_rt.inject(model, uora_rt.UORAConfig(r=8, target_modules=["c_attn", "c_proj"]))
    shared = shared_state(model)
    assert (shared.spec.max_out, shared.spec.max_in) == (192, 256)  # c_attn out, mlp.c_proj in
    randomize_lambdas(model)
    check_layers_against_reference(model, lambda: model(torch.arange(9)[None]))


def test_regex_targets_and_errors():
    model = tiny_bert()
    uora_rt.inject(model, uora_rt.UORAConfig(r=8, target_modules=r".*attention\.self\.(query|key)"))
    assert len(adapter_layers(model)) == 4
    with pytest.raises(ValueError, match="already has a UORA adapter"):
        uora_rt.inject(model, uora_rt.UORAConfig(r=8))
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        uora_rt.inject(tiny_bert(), uora_rt.UORAConfig(r=8, target_modules=["nope"]))
    with pytest.raises(ValueError, match="r = 80 > min"):
        uora_rt.inject(tiny_bert(), uora_rt.UORAConfig(r=80))


def test_merge_unmerge():
    model = tiny_llama()
    uora_rt.inject(model, uora_rt.UORAConfig(r=16,
                                             target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lambdas(model, scale=0.3)
    ids = torch.arange(12)[None]
    weights = {n: l.base_layer.weight.clone() for n, l in adapter_layers(model)}
    with torch.no_grad():
        before = model(ids).logits
        uora_rt.merge(model)
        merged = model(ids).logits
        uora_rt.unmerge(model)
        after = model(ids).logits
    assert_close(merged, before, table={torch.float32: (1e-4, 1e-4)})
    assert_close(after, before, table={torch.float32: (1e-5, 1e-5)})
    for n, l in adapter_layers(model):
        assert_close(l.base_layer.weight, weights[n], table={torch.float32: (1e-6, 0)})
    with pytest.raises(ValueError, match="not merged"):
        uora_rt.unmerge(model)


def test_save_load_roundtrip_is_exact(tmp_path):
    model = tiny_llama()
    uora_rt.inject(model, uora_rt.UORAConfig(r=16, tau=0.05))
    randomize_lambdas(model, scale=0.1)
    assert uora_rt.reinit_step(model) > 0  # tau = 0.05 catches some |lambda_d| < 0.05
    path = tmp_path / "a.uora"
    uora_rt.save_adapter(model, path)
    fresh = tiny_llama()  # same seed: same base weights
    uora_rt.load_adapter(fresh, path)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert torch.equal(shared_state(fresh).A, shared_state(model).A)
    assert torch.equal(shared_state(fresh).events, shared_state(model).events)
    # loading into an already-injected model of the same family also works
    uora_rt.load_adapter(fresh, path)
    with pytest.raises(uora_rt.AdapterFormatError, match="targets"):
        other = tiny_llama()
        uora_rt.inject(other, uora_rt.UORAConfig(r=16, target_modules=["q_proj"]))
        uora_rt.load_adapter(other, path)


def test_state_dict_resumes_reinit_record():
    model = tiny_llama()
    uora_rt.inject(model, uora_rt.UORAConfig(r=16, tau=0.05))
    randomize_lambdas(model, scale=0.1)
    uora_rt.reinit_step(model)
    clone = tiny_llama()
    uora_rt.inject(clone, uora_rt.UORAConfig(r=16, tau=0.05))
    clone.load_state_dict(model.state_dict())
    a, b = shared_state(model), shared_state(clone)
    assert torch.equal(a.p, b.p) and torch.equal(a.counts, b.counts)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_bfloat16_base_keeps_float32_adapter():
    model = tiny_llama().to(torch.bfloat16)
    uora_rt.inject(model, uora_rt.UORAConfig(r=16))
    randomize_lambdas(model, scale=0.3)
    model.to(torch.bfloat16)  # a second cast must not touch adapter state
    shared = shared_state(model)
    assert shared.A.dtype == torch.float32 and shared.counts.dtype == torch.int32
    _, layer = adapter_layers(model)[0]
    assert layer.lambda_b.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    ids = torch.arange(8)[None]
    for name, (x, y) in layer_inputs(model, lambda: model(ids)).items():
        layer = dict(adapter_layers(model))[name]
        want = reference.uora_linear(x, layer.base_layer.weight, None, shared.A, shared.B,
                                     layer.lambda_b, layer.lambda_d)
        assert y.dtype == torch.bfloat16
        assert_close(y, want, dtype=torch.bfloat16)


def test_training_step_updates_only_lambdas_and_deepcopy_shares_state():
    model = tiny_llama()
    uora_rt.inject(model, uora_rt.UORAConfig(r=16))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 97, (2, 10))
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
    _, layer = adapter_layers(model)[0]
    assert layer.lambda_b.abs().sum() > 0
    twin = copy.deepcopy(model)
    tl = adapter_layers(twin)
    assert all(l.shared is shared_state(twin) for _, l in tl)
    assert shared_state(twin) is not shared_state(model)
