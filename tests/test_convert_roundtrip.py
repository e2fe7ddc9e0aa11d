"""PEFT VeRA -> .uora -> PEFT VeRA on tiny Llama, GPT-2 (Conv1D, fan_in_fan_out) and BERT, with and
without saved projections: the round trip's outputs equal PEFT's own forward, bit for bit."""

import json

import pytest
import torch
from convert_helpers import forward, fresh, peft_load, peft_vera, save_base
from uora_rt.core import format as fmt
from uora_rt.convert import from_peft, to_peft_vera

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CASES = [  # kind, targets, r, projection_prng_key, save_projection
    ("llama", ["q_proj", "v_proj"], 8, 0, True),
    ("llama", ["q_proj", "v_proj"], 8, 0, False),
    ("llama", ["q_proj", "v_proj", "down_proj", "up_proj"], 16, 7, False),
    ("llama", r".*\.(k_proj|o_proj|gate_proj)", 32, 2**32 + 5, False),
    ("gpt2", ["c_attn"], 8, 3, False),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], 32, 0, True),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], 24, 11, False),
    ("bert", ["query", "value"], 4, 11, False),
    ("bert", ["query", "key", "value", "dense"], 24, -3, False),
    ("bert", ["query", "key", "value", "dense"], 24, 5, True),
]


@pytest.mark.parametrize("kind,targets,r,seed,saved", CASES)
def test_peft_vera_roundtrip_equals_peft_forward(tmp_path, kind, targets, r, seed, saved):
    base = save_base(kind, tmp_path / "base")
    model, want = peft_vera(kind, tmp_path / "peft", r=r, targets=targets, seed=seed,
                            save_projection=saved)
    assert not torch.equal(want, forward(fresh(kind)))  # the adapter is not a no-op

    adapter = from_peft(tmp_path / "peft", tmp_path / "a.uora", base=base)
    loaded = fmt.load(tmp_path / "a.uora")  # the file passes the reader's validation
    spec = loaded.projection
    assert spec.algorithm == (fmt.EXPLICIT_ALGORITHM if saved else fmt.PEFT_VERA_ALGORITHM)
    assert spec == adapter.projection and spec.r == r
    # PEFT's in-memory projections: max_in/max_out and (unsaved) the regenerated draw agree.
    peft_a = model.base_model.vera_A["default"]
    peft_b = model.base_model.vera_B["default"]
    assert (spec.r, spec.max_in) == tuple(peft_a.shape) and spec.max_out == peft_b.shape[0]
    peft_modules = {n[len("base_model.model."):] for n, m in model.named_modules()
                    if hasattr(m, "vera_lambda_b")}
    assert set(loaded.targets) == peft_modules

    to_peft_vera(tmp_path / "a.uora", tmp_path / "back", base=base)
    back = peft_load(kind, tmp_path / "back")
    assert torch.equal(back.base_model.vera_A["default"], peft_a)
    assert torch.equal(back.base_model.vera_B["default"], peft_b)
    assert torch.equal(forward(back), want)
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["save_projection"] is True and cfg["fan_in_fan_out"] is (kind == "gpt2")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_base_as_module_and_from_base_model_name_or_path(tmp_path, kind):
    base = save_base(kind, tmp_path / "base")
    _, want = peft_vera(kind, tmp_path / "peft", r=8, targets=None, save_projection=False)
    cfg_path = tmp_path / "peft" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg))
    from_module = from_peft(tmp_path / "peft", tmp_path / "m.uora", base=fresh(kind))
    from_hint = from_peft(tmp_path / "peft", tmp_path / "h.uora")  # base from the config
    assert from_module.base["modules"] == from_hint.base["modules"]
    assert from_module.projection == from_hint.projection
    assert from_module.base_fingerprint() == from_hint.base_fingerprint()
    for name in ("m", "h"):
        to_peft_vera(tmp_path / f"{name}.uora", tmp_path / f"back_{name}", base=fresh(kind))
        assert torch.equal(forward(peft_load(kind, tmp_path / f"back_{name}")), want)


def test_to_peft_vera_without_base_uses_the_file(tmp_path):
    base = save_base("gpt2", tmp_path / "base")
    _, want = peft_vera("gpt2", tmp_path / "peft", r=8, targets=["c_attn", "c_fc"],
                        save_projection=False)
    from_peft(tmp_path / "peft", tmp_path / "a.uora", base=base)
    to_peft_vera(fmt.load(tmp_path / "a.uora"), tmp_path / "back")  # an Adapter, no base
    cfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["base_model_name_or_path"] is None
    assert torch.equal(forward(peft_load("gpt2", tmp_path / "back")), want)
