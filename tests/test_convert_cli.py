"""`uora-rt convert` and `uora-rt inspect`: single adapters, a folder of adapters with bad ones
among them (the batch goes on), the LoRA byte report, inspect's numbers, and demo still parses."""

import json
import shutil

import pytest
import torch
import uora_rt
from conftest import MODEL_TOL, assert_close
from convert_helpers import forward, fresh, peft_load, peft_vera, save_base
from models_tiny import randomize_lambdas
from uora_rt.core import format as fmt
from uora_rt.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture()
def setup(tmp_path):
    base = save_base("llama", tmp_path / "base")
    _, want = peft_vera("llama", tmp_path / "peft", r=8, targets=["q_proj", "v_proj"],
                        save_projection=False)
    return tmp_path, base, want


def test_single_conversions(setup, capsys):
    tmp, base, want = setup
    assert main(["convert", str(tmp / "peft"), str(tmp / "a.uora"), "--to", "uora",
                 "--base", str(base)]) == 0
    assert fmt.load(tmp / "a.uora").projection.algorithm == fmt.PEFT_VERA_ALGORITHM
    assert main(["convert", str(tmp / "a.uora"), str(tmp / "vera"), "--to", "peft-vera"]) == 0
    assert torch.equal(forward(peft_load("llama", tmp / "vera")), want)
    # PEFT VeRA straight to LoRA: converted in memory, never written as .uora.
    capsys.readouterr()
    assert main(["convert", str(tmp / "peft"), str(tmp / "lora"), "--to", "peft-lora",
                 "--base", str(base)]) == 0
    out = capsys.readouterr().out
    assert "LoRA export" in out and "bytes of weights" in out and "bytes of .uora" in out
    assert_close(forward(peft_load("llama", tmp / "lora")), want, table=MODEL_TOL)
    # Into an existing folder: the .uora gets the adapter's name.
    (tmp / "outdir").mkdir()
    assert main(["convert", str(tmp / "peft"), str(tmp / "outdir"), "--to", "uora",
                 "--base", str(base)]) == 0
    assert (tmp / "outdir" / "peft.uora").is_file()


def test_single_errors_are_one_line(setup, capsys):
    tmp, _, _ = setup
    assert main(["convert", str(tmp / "peft"), str(tmp / "x.uora"), "--to", "uora"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--base DIR" in err and "Traceback" not in err
    assert main(["convert", str(tmp / "nope"), str(tmp / "x"), "--to", "uora"]) == 1
    assert "no such file or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["convert", str(tmp / "peft"), str(tmp / "x"), "--to", "gguf"])


def test_folder_goes_on_past_bad_adapters(setup, capsys):
    tmp, base, want = setup
    batch = tmp / "batch"
    batch.mkdir()
    shutil.copytree(tmp / "peft", batch / "good")
    peft_vera("llama", batch / "good2", r=4, targets=["o_proj"], seed=3)
    shutil.copytree(tmp / "peft", batch / "corrupt")
    (batch / "corrupt" / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    from peft import LoraConfig, get_peft_model

    get_peft_model(fresh("llama"), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(
        str(batch / "a_lora"))
    (batch / "notes.txt").write_text("not an adapter")
    rc = main(["convert", str(batch), str(tmp / "out"), "--to", "uora", "--base", str(base)])
    out = capsys.readouterr().out
    assert rc == 1  # some adapters failed
    assert "converted 2, skipped 3 (2 failed)" in out
    assert "a_lora: " in out and "peft_type" in out and "'LORA'" in out
    assert "corrupt: " in out and "adapter_model.safetensors" in out
    assert "notes.txt: not an adapter" in out
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["good.uora", "good2.uora"]
    assert main(["convert", str(tmp / "out"), str(tmp / "back"), "--to", "peft-vera"]) == 0
    assert torch.equal(forward(peft_load("llama", tmp / "back" / "good")), want)


def test_inspect(tmp_path, capsys):
    model = fresh("llama")
    uora_rt.inject(model, uora_rt.UORAConfig(r=8, tau=0.05))
    randomize_lambdas(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda_d"):
                p[2] = 0.0  # every layer: index 2 fires once per layer per step
    uora_rt.reinit_step(model)
    path = tmp_path / "a.uora"
    uora_rt.save_adapter(model, path)
    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    # Independent numbers: the model's parameter count, the file size, P after 4 events at index 2.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert d["parameters"]["total"] == trainable and d["bytes"]["total"] == path.stat().st_size
    assert d["p"]["reinitialized_indices"] == 1 and d["p"]["events"] == 4
    assert d["p"]["min"] == 0.5**4 and d["p"]["max"] == 1.0
    assert d["projection"]["algorithm"] == "uora-philox-qr-v1" and d["projection"]["r"] == 8
    assert len(d["targets"]) == 4 and d["targets"]["model.layers.0.self_attn.v_proj"] == [32, 64]
    assert d["base"]["fingerprint"] == fmt.load(path).base_fingerprint()
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    for frag in ("uora-philox-qr-v1", "fingerprint", "1 of 8 indices reinitialized", "4 events",
                 "model.layers.1.self_attn.q_proj", f"{path.stat().st_size:,}"):
        assert frag in text, text


def test_inspect_errors(setup, capsys):
    tmp, _, _ = setup
    assert main(["inspect", str(tmp / "peft")]) == 1
    assert "convert it first" in capsys.readouterr().err
    (tmp / "bad.uora").write_bytes(b"\x01\x02")
    assert main(["inspect", str(tmp / "bad.uora")]) == 1
    assert "truncated" in capsys.readouterr().err


def test_demo_subcommand_still_parses():
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
