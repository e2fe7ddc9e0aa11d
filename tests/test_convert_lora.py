"""Exports to PEFT: the exact rank-r LoRA equals the UORA forward (uora_rt.load_adapter) and the
PEFT VeRA forward; UORA files exported as PEFT VeRA equal ours; the authors' UORA checkpoints
(modified A/B) convert as explicit projections."""

import json
import shutil

import pytest
import torch
import uora_rt
from conftest import MODEL_TOL, assert_close, requires_minilm
from convert_helpers import forward, fresh, peft_load, peft_vera, rewrite_safetensors, save_base
from models_tiny import randomize_lambdas
from uora_rt.core import format as fmt
from uora_rt.convert import from_peft, to_peft_lora, to_peft_vera
from uora_rt.training.inject import adapter_layers, shared_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

UORA_CASES = [  # kind, targets, r, seed
    ("llama", ["q_proj", "v_proj", "down_proj"], 16, 0),
    ("gpt2", ["c_attn", "c_proj"], 8, 5),
    ("bert", ["query", "value", "dense"], 24, 3),
]


def trained_uora(kind, targets, r, seed, path):
    """A UORA adapter with random lambdas and reinitialized indices (P < 1), saved to `path`."""
    model = fresh(kind)
    uora_rt.inject(model, uora_rt.UORAConfig(r=r, target_modules=targets, seed=seed, tau=0.05))
    randomize_lambdas(model, seed=seed + 1, scale=0.5)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lambda_d[1::3] = 0.0  # below tau: these indices reinitialize
    assert uora_rt.reinit_step(model) > 0 and uora_rt.reinit_step(model) > 0
    assert bool((shared_state(model).p < 1).any())
    uora_rt.save_adapter(model, path)
    return path


@pytest.mark.parametrize("kind,targets,r,seed", UORA_CASES)
def test_uora_file_to_lora_and_vera_equal_the_uora_forward(tmp_path, kind, targets, r, seed):
    base = save_base(kind, tmp_path / "base")
    path = trained_uora(kind, targets, r, seed, tmp_path / "a.uora")
    ours = forward(uora_rt.load_adapter(fresh(kind), path))
    plain = forward(fresh(kind))
    assert (ours - plain).abs().max() > 1e-2  # not a no-op

    report = to_peft_lora(path, tmp_path / "lora", base=base)
    lora = peft_load(kind, tmp_path / "lora")
    assert type(lora.base_model).__name__ == "LoraModel"
    assert_close(forward(lora), ours, table=MODEL_TOL)
    to_peft_vera(path, tmp_path / "vera", base=base)
    assert_close(forward(peft_load(kind, tmp_path / "vera")), ours, table=MODEL_TOL)

    # The live matrices matter: the same lambdas on the initial A0/B0 (P ignored) differ.
    adapter = fmt.load(path)
    adapter.p = torch.ones_like(adapter.p)
    to_peft_lora(adapter, tmp_path / "lora_p1", base=base)
    stale = forward(peft_load(kind, tmp_path / "lora_p1"))
    assert (stale - ours).abs().max() > 100 * MODEL_TOL[torch.float32][0]

    # Byte report: exactly the files on disk; LoRA carries r * (in + out) floats per target.
    assert report.uora_bytes == path.stat().st_size
    assert report.lora_bytes == (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    modules = adapter.base["modules"]
    assert report.lora_bytes >= 4 * r * sum(o + i for o, i in modules.values())
    assert report.lora_bytes > report.uora_bytes and report.ratio > 1
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == r and cfg["peft_type"] == "LORA"


@pytest.mark.parametrize("kind,targets,saved", [
    ("llama", ["q_proj", "v_proj", "up_proj"], False), ("gpt2", ["c_attn", "c_fc"], True),
    ("bert", ["query", "value"], False)])
def test_vera_derived_lora_equals_peft_vera(tmp_path, kind, targets, saved):
    base = save_base(kind, tmp_path / "base")
    _, want = peft_vera(kind, tmp_path / "peft", r=16, targets=targets, seed=9,
                        save_projection=saved)
    adapter = from_peft(tmp_path / "peft", None, base=base)  # in memory, never written
    report = to_peft_lora(adapter, tmp_path / "lora", base=fresh(kind))
    assert_close(forward(peft_load(kind, tmp_path / "lora")), want, table=MODEL_TOL)
    assert report.uora_bytes > 0 and adapter.path is None


def test_in_memory_uora_adapter(tmp_path):
    model = fresh("llama")
    uora_rt.inject(model, uora_rt.UORAConfig(r=8))
    randomize_lambdas(model)
    ours = forward(model)
    report = to_peft_lora(uora_rt.to_adapter(model), tmp_path / "lora")
    assert_close(forward(peft_load("llama", tmp_path / "lora")), ours, table=MODEL_TOL)
    uora_rt.save_adapter(model, tmp_path / "a.uora")
    assert report.uora_bytes == (tmp_path / "a.uora").stat().st_size


def modified_vera(tmp_path, kind="llama"):
    """A VeRA checkpoint whose saved A/B were changed after training, as the UORA authors'
    VeRA-based code saves them; PEFT itself loads those matrices (the reference)."""
    save_base(kind, tmp_path / "base")
    model, _ = peft_vera(kind, tmp_path / "peft", r=8, targets=["q_proj", "v_proj"], seed=4)
    a = model.base_model.vera_A["default"]
    b = model.base_model.vera_B["default"]
    g = torch.Generator().manual_seed(0)
    qa = torch.linalg.qr(torch.randn(a.shape[1], a.shape[0], generator=g))[0].T.contiguous()
    qb = torch.linalg.qr(torch.randn(b.shape, generator=g))[0].contiguous()
    mod = tmp_path / "modified"
    mod.mkdir()
    shutil.copy(tmp_path / "peft" / "adapter_config.json", mod / "adapter_config.json")

    def edit(t):
        t["base_model.vera_A"] = 0.5 * t["base_model.vera_A"] + 0.5 * qa
        t["base_model.vera_B"] = 0.5 * t["base_model.vera_B"] + 0.5 * qb

    rewrite_safetensors(tmp_path / "peft" / "adapter_model.safetensors",
                        mod / "adapter_model.safetensors", edit)
    return mod, forward(peft_load(kind, mod)), forward(peft_load(kind, tmp_path / "peft"))


def test_authors_vera_checkpoint_with_modified_projections(tmp_path):
    mod, want, unmodified = modified_vera(tmp_path)
    assert not torch.equal(want, unmodified)
    adapter = from_peft(mod, tmp_path / "m.uora", base=tmp_path / "base")
    assert adapter.projection.algorithm == fmt.EXPLICIT_ALGORITHM
    to_peft_vera(tmp_path / "m.uora", tmp_path / "back", base=tmp_path / "base")
    assert torch.equal(forward(peft_load("llama", tmp_path / "back")), want)
    to_peft_lora(tmp_path / "m.uora", tmp_path / "lora")
    assert_close(forward(peft_load("llama", tmp_path / "lora")), want, table=MODEL_TOL)


def test_authors_uora_tuner_checkpoint(tmp_path):
    # Their UORA tuner: peft_type "UORA", keys uora_lambda_b/d and base_model.uora_A/B. PEFT cannot
    # load it, so the reference is PEFT VeRA on the same numbers under VeRA's key names.
    mod, want, _ = modified_vera(tmp_path)
    uora_dir = tmp_path / "authors"
    uora_dir.mkdir()
    cfg = json.loads((mod / "adapter_config.json").read_text())
    cfg.update(peft_type="UORA", uora_dropout=0.0, alpha=0.5, tau=1e-5, count_k=1)
    del cfg["vera_dropout"]
    (uora_dir / "adapter_config.json").write_text(json.dumps(cfg))

    def rename(t):
        for k in list(t):
            t[k.replace("vera_", "uora_")] = t.pop(k)

    rewrite_safetensors(mod / "adapter_model.safetensors",
                        uora_dir / "adapter_model.safetensors", rename)
    adapter = from_peft(uora_dir, tmp_path / "u.uora", base=tmp_path / "base")
    assert adapter.projection.algorithm == fmt.EXPLICIT_ALGORITHM
    assert adapter.training["tau"] == 1e-5 and adapter.training["source"] == "peft UORA"
    to_peft_vera(tmp_path / "u.uora", tmp_path / "back", base=tmp_path / "base")
    assert torch.equal(forward(peft_load("llama", tmp_path / "back")), want)


@requires_minilm
def test_real_minilm_checkpoint(tmp_path):
    # all-MiniLM-L6-v2 (real weights, an HF folder): base shapes come from its safetensors header.
    from transformers import BertModel
    from uora_rt.models import assets

    folder = assets.minilm_dir()

    def minilm():
        return BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()

    ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 102]])
    model = minilm()
    uora_rt.inject(model, uora_rt.UORAConfig(r=32, target_modules=["query", "value"], tau=0.05))
    randomize_lambdas(model, scale=0.3)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lambda_d[::5] = 0.0
    assert uora_rt.reinit_step(model) > 0
    uora_rt.save_adapter(model, tmp_path / "a.uora")
    with torch.no_grad():
        ours = model(input_ids=ids)[0]
    report = to_peft_lora(tmp_path / "a.uora", tmp_path / "lora", base=folder)
    to_peft_vera(tmp_path / "a.uora", tmp_path / "vera", base=folder)
    from peft import PeftModel

    for out in ("lora", "vera"):
        peft_model = PeftModel.from_pretrained(minilm(), str(tmp_path / out)).eval()
        with torch.no_grad():
            assert_close(peft_model(input_ids=ids)[0], ours, table=MODEL_TOL, msg=out)
    # 12 targets of 384 x 384 at r 32: LoRA holds 12 * 32 * 768 floats, the .uora 12 * (384 + 32).
    assert report.lora_bytes >= 12 * 32 * 768 * 4 > 20 * report.uora_bytes
