"""Bad inputs to the converters: every one raises an error naming the file, the key, what was
expected and what was found (AdapterFormatError for adapter files)."""

import json
import shutil
import struct

import pytest
import torch
from convert_helpers import fresh, peft_vera, rewrite_safetensors, save_base
from models_tiny import tiny_llama
from uora_rt.convert import from_peft, to_peft_lora, to_peft_vera
from uora_rt.errors import AdapterFormatError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

W = "adapter_model.safetensors"
C = "adapter_config.json"


@pytest.fixture()
def vera(tmp_path):
    """(a saved Llama VeRA folder with projections, its base folder)."""
    base = save_base("llama", tmp_path / "base")
    peft_vera("llama", tmp_path / "peft", r=8, targets=["q_proj", "v_proj"])
    return tmp_path / "peft", base


def copy(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def expect(path, key, *fragments, base=None, out=None):
    with pytest.raises(AdapterFormatError) as info:
        from_peft(path, out, base=base)
    msg = str(info.value)
    assert key in msg, msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


def test_another_peft_type(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = save_base("llama", tmp_path / "base")
    get_peft_model(fresh("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "lora"))
    msg = expect(tmp_path / "lora", "peft_type", "'VERA'", "'LORA'", base=base)
    assert str(tmp_path / "lora" / C) in msg


def test_missing_files(vera, tmp_path):
    peft, base = vera
    expect(tmp_path / "nowhere", "<folder>", "no such directory", base=base)
    no_cfg = copy(peft, tmp_path / "no_cfg")
    (no_cfg / C).unlink()
    expect(no_cfg, "<file>", C, "no such file", base=base)
    no_w = copy(peft, tmp_path / "no_w")
    (no_w / W).unlink()
    expect(no_w, "<file>", W, "no such file", base=base)
    torch.save({"x": torch.zeros(1)}, no_w / "adapter_model.bin")
    expect(no_w, "<file>", "adapter_model.bin", "pickle is never loaded", base=base)


def test_bad_config(vera, tmp_path):
    peft, base = vera
    bad = copy(peft, tmp_path / "bad")
    (bad / C).write_text("{not json")
    expect(bad, "<json>", "unparseable", base=base)
    cfg = json.loads((peft / C).read_text())
    (bad / C).write_text(json.dumps(cfg | {"r": "8"}))
    expect(bad, "r", "an int >= 1", "'8'", base=base)
    (bad / C).write_text(json.dumps(cfg | {"r": 6}))
    expect(bad, "vera_lambda_d", "shape [6]", "[8]", base=base)


def test_targets_absent_from_base(vera, tmp_path):
    peft, _ = vera
    gpt2 = save_base("gpt2", tmp_path / "gpt2")
    msg = expect(peft, "base_model.model.model.layers.0.self_attn.q_proj.vera_lambda_b",
                 "no such module", base=gpt2)
    assert str(gpt2) in msg and str(peft / W) in msg


def test_shape_mismatch_with_base(vera, tmp_path):
    peft, _ = vera
    other = tmp_path / "other"
    tiny_llama(num_key_value_heads=4).save_pretrained(str(other))  # v_proj out 64, not 32
    expect(peft, "layers.0.self_attn.v_proj.vera_lambda_b", "shape [64]", "[32]",
           "shape mismatch", base=other)
    expect(peft, "v_proj.vera_lambda_b", "shape mismatch", base=tiny_llama(num_key_value_heads=4))


def test_projection_too_small_for_the_base(vera, tmp_path):
    peft, base = vera
    bad = copy(peft, tmp_path / "bad")
    rewrite_safetensors(peft / W, bad / W, lambda t: t.update(
        {"base_model.vera_A": t["base_model.vera_A"][:, :40].contiguous()}))
    expect(bad, "base_model.vera_A", "max_in >= 64", "max_in = 40", base=base)
    rewrite_safetensors(peft / W, bad / W, lambda t: t.update(
        {"base_model.vera_B": t["base_model.vera_B"][:, :5].contiguous()}))
    expect(bad, "base_model.vera_B", "[max_out, r=8]", "[64, 5]", base=base)
    rewrite_safetensors(peft / W, bad / W, lambda t: t.pop("base_model.vera_B"))
    expect(bad, "base_model.vera_B", "missing", base=base)
    rewrite_safetensors(peft / W, bad / W, lambda t: [t.pop("base_model.vera_A"),
                                                      t.pop("base_model.vera_B")])
    expect(bad, "base_model.vera_A", "save_projection=true", "missing", base=base)


def test_bad_tensors(vera, tmp_path):
    peft, base = vera
    bad = copy(peft, tmp_path / "bad")
    key = "base_model.model.model.layers.1.self_attn.q_proj.vera_lambda_b"
    rewrite_safetensors(peft / W, bad / W, lambda t: t[key].__setitem__(3, float("nan")))
    expect(bad, key, "finite values", "NaN", base=base)
    rewrite_safetensors(peft / W, bad / W, lambda t: t.pop(key.replace("_b", "_d")))
    expect(bad, key.replace("_b", "_d"), "missing", base=base)
    rewrite_safetensors(peft / W, bad / W, lambda t: t.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias": torch.zeros(64)}))
    expect(bad, "q_proj.base_layer.bias", "an extra tensor", "not representable", base=base)
    rewrite_safetensors(peft / W, bad / W, lambda t: t.update({key: t[key].to(torch.int32)}))
    expect(bad, key, "floating-point", "int32", base=base)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "short_data", "bad_offsets"])
def test_corrupted_safetensors(vera, tmp_path, damage):
    peft, base = vera
    bad = copy(peft, tmp_path / "bad")
    data = (peft / W).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if damage == "empty":
        data = b""
    elif damage == "truncated":
        data = data[:100]
    elif damage == "garbage":
        data = struct.pack("<Q", 16) + b"\xff\xfe not json at all" + b"\0" * 32
    elif damage == "short_data":
        data = data[:-7]
    else:  # overlapping offsets, same total size
        first = next(k for k in header if k != "__metadata__")
        header[first]["data_offsets"] = [0, header[first]["data_offsets"][1] - 4]
        raw = json.dumps(header).encode()
        data = struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    (bad / W).write_bytes(data)
    with pytest.raises(AdapterFormatError) as info:
        from_peft(bad, None, base=base)
    assert str(bad / W) in str(info.value)


def test_no_base(vera, tmp_path):
    peft, _ = vera
    with pytest.raises(ValueError, match="base_model_name_or_path=None is not a local model"):
        from_peft(peft, tmp_path / "x.uora")
    with pytest.raises(FileNotFoundError, match="not a local folder"):
        from_peft(peft, tmp_path / "x.uora", base=tmp_path / "missing")
    assert not (tmp_path / "x.uora").exists()


def test_rank_too_large_for_a_uora_file(tmp_path):
    base = save_base("llama", tmp_path / "base")
    peft_vera("llama", tmp_path / "peft", r=80, targets=["q_proj"], save_projection=False)
    expect(tmp_path / "peft", "r", "r <= min(max_in, max_out) = min(64, 64)", "80", base=base)


def test_uora_authors_checkpoint_without_projections(vera, tmp_path):
    peft, base = vera
    bad = tmp_path / "authors"
    bad.mkdir()
    cfg = json.loads((peft / C).read_text()) | {"peft_type": "UORA"}
    (bad / C).write_text(json.dumps(cfg))

    def rename(t):
        for k in list(t):
            v = t.pop(k)
            if "lambda" in k:
                t[k.replace("vera_", "uora_")] = v

    rewrite_safetensors(peft / W, bad / W, rename)
    expect(bad, "base_model.uora_A", "cannot be rebuilt", "re-save", base=base)


def test_exports_check_the_base(vera, tmp_path):
    peft, base = vera
    from_peft(peft, tmp_path / "a.uora", base=base)
    other = tiny_llama(num_key_value_heads=4)
    for export in (to_peft_vera, to_peft_lora):
        with pytest.raises(AdapterFormatError) as info:
            export(tmp_path / "a.uora", tmp_path / "out", base=other)
        msg = str(info.value)
        assert "v_proj" in msg and "[32, 64]" in msg and "[64, 64]" in msg, msg
        with pytest.raises(AdapterFormatError, match="no such module"):
            export(tmp_path / "a.uora", tmp_path / "out", base=fresh("bert"))
    (tmp_path / "bad.uora").write_bytes(b"\0" * 3)
    with pytest.raises(AdapterFormatError, match="truncated"):
        to_peft_lora(tmp_path / "bad.uora", tmp_path / "out2")
