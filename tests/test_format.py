"""The `.uora` reader: every malformed file raises AdapterFormatError naming file, key,
expectation."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import uora_rt
from models_tiny import randomize_lambdas, tiny_llama
from uora_rt.core import format as fmt
from uora_rt.errors import AdapterFormatError


@pytest.fixture()
def good(tmp_path):
    model = tiny_llama()
    uora_rt.inject(model, uora_rt.UORAConfig(r=16))
    randomize_lambdas(model)
    path = tmp_path / "good.uora"
    uora_rt.save_adapter(model, path)
    return path


def rewrite(src, dst, edit_tensors=None, edit_meta=None):
    """Copies a .uora file, letting the test edit its tensors and metadata."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def expect_error(path, key, *fragments):
    with pytest.raises(AdapterFormatError) as info:
        fmt.load(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


def test_good_file_loads(good):
    adapter = fmt.load(good)
    assert adapter.r == 16 and len(adapter.targets) == 4
    assert adapter.projection.algorithm == "uora-philox-qr-v1"
    assert adapter.base["architecture"] == "LlamaForCausalLM"


def test_truncated(good, tmp_path):
    data = good.read_bytes()
    for n in (0, 5, 100, len(data) - 1):
        bad = tmp_path / f"trunc{n}.uora"
        bad.write_bytes(data[:n])
        expect_error(bad, "<", "truncated")


def test_not_safetensors(tmp_path):
    bad = tmp_path / "text.uora"
    bad.write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"x" * 10)
    expect_error(bad, "<header>", "not safetensors")
    pickled = tmp_path / "pickle.uora"
    torch.save({"a": torch.zeros(2)}, pickled)
    expect_error(pickled, "<header>")


def test_wrong_format_and_version(good, tmp_path):
    bad = rewrite(good, tmp_path / "fmt.uora", edit_meta=lambda m: m.update(format="pt"))
    expect_error(bad, "__metadata__.format", "'uora'", "'pt'")
    bad = rewrite(good, tmp_path / "ver.uora", edit_meta=lambda m: m.update(format_version="7"))
    expect_error(bad, "__metadata__.format_version", "'7'")
    bad = tmp_path / "nometa.uora"
    save_file({"x": torch.zeros(1)}, str(bad))
    expect_error(bad, "__metadata__")


def test_missing_and_extra_keys(good, tmp_path):
    bad = rewrite(good, tmp_path / "missing.uora",
                  edit_tensors=lambda t: t.pop("model.layers.1.self_attn.v_proj.lambda_d"))
    expect_error(bad, "model.layers.1.self_attn.v_proj.lambda_d", "missing")
    bad = rewrite(good, tmp_path / "extra.uora",
                  edit_tensors=lambda t: t.update({"stray.weight": torch.zeros(3)}))
    expect_error(bad, "stray.weight", "unexpected")
    bad = rewrite(good, tmp_path / "meta.uora", edit_meta=lambda m: m.pop("base"))
    expect_error(bad, "__metadata__.base", "missing")


def test_wrong_shape_and_dtype(good, tmp_path):
    key = "model.layers.0.self_attn.q_proj.lambda_b"
    bad = rewrite(good, tmp_path / "shape.uora",
                  edit_tensors=lambda t: t.update({key: torch.zeros(63)}))
    expect_error(bad, key, "[64]", "[63]")
    bad = rewrite(good, tmp_path / "dtype.uora",
                  edit_tensors=lambda t: t.update({key: t[key].double()}))
    expect_error(bad, key, "float32", "float64")


def test_nan_and_inf(good, tmp_path):
    key = "model.layers.0.self_attn.v_proj.lambda_d"

    def poison(value):
        def edit(t):
            t[key] = t[key].clone()
            t[key][2] = value
        return edit

    for value in (float("nan"), float("inf")):
        bad = rewrite(good, tmp_path / f"p{value}.uora", edit_tensors=poison(value))
        expect_error(bad, key, "NaN or Inf")


def test_p_outside_unit_interval(good, tmp_path):
    for value in (0.0, 1.5, -0.25):
        bad = rewrite(good, tmp_path / f"p{value}.uora",
                      edit_tensors=lambda t: t["reinit.p"].__setitem__(0, value))
        expect_error(bad, "reinit.p", "(0, 1]")


def test_r_mismatch(good, tmp_path):
    def shrink(t):
        t["reinit.p"] = torch.ones(15)
    bad = rewrite(good, tmp_path / "r.uora", edit_tensors=shrink)
    expect_error(bad, "reinit.p", "r mismatch", "[16]")
    bad = rewrite(good, tmp_path / "r2.uora", edit_meta=lambda m: m.update(
        projection=json.dumps({**json.loads(m["projection"]), "r": 8})))
    expect_error(bad, "lambda_d", "r mismatch")


def test_projection_spec_checked(good, tmp_path):
    def alg(m):
        m["projection"] = json.dumps({**json.loads(m["projection"]), "algorithm": "svd-v0"})
    expect_error(rewrite(good, tmp_path / "alg.uora", edit_meta=alg),
                 "__metadata__.projection.algorithm", "svd-v0")
    def seed(m):
        m["projection"] = json.dumps({**json.loads(m["projection"]), "seed": -3})
    expect_error(rewrite(good, tmp_path / "seed.uora", edit_meta=seed), "projection.seed")
    expect_error(rewrite(good, tmp_path / "json.uora",
                         edit_meta=lambda m: m.update(targets="[oops")),
                 "__metadata__.targets", "JSON")


def test_base_mismatch(good, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2))
    with pytest.raises(AdapterFormatError) as info:
        uora_rt.load_adapter(other, good)
    assert "base.modules.model.layers.0.self_attn.q_proj" in str(info.value)
    assert "[64, 64]" in str(info.value) and "[32, 32]" in str(info.value)


def test_failed_load_leaves_model_untouched(good, tmp_path):
    model = tiny_llama()
    uora_rt.load_adapter(model, good)
    ids = torch.arange(6)[None]
    with torch.no_grad():
        before = model(ids).logits
    bad = rewrite(good, tmp_path / "nan.uora",
                  edit_tensors=lambda t: t["reinit.p"].__setitem__(1, 0.0))
    with pytest.raises(AdapterFormatError):
        uora_rt.load_adapter(model, bad)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_write_is_atomic_and_roundtrips(good, tmp_path):
    adapter = fmt.load(good)
    out = tmp_path / "copy.uora"
    fmt.save(adapter, out)
    again = fmt.load(out)
    assert again.targets == adapter.targets and again.projection == adapter.projection
    for t in adapter.targets:
        assert torch.equal(again.lambda_b[t], adapter.lambda_b[t])
    assert not list(tmp_path.glob("*.tmp"))


def test_saved_file_has_the_umask_permissions(good, tmp_path):
    import os
    import stat

    (tmp_path / "plain").write_bytes(b"x")  # what any plain open() creates here
    want = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    assert stat.S_IMODE(os.stat(good).st_mode) == want
