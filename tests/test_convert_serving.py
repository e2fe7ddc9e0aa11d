"""Converted PEFT adapters served by the runtime: a mixed batch of a regenerated-draw VeRA adapter
(peft-vera-kaiming-mt19937), a saved-projection one (explicit) and a UORA adapter; every row
equals PEFT's own forward of the adapter it asked for."""

import pytest
import torch

import uora_rt
from conftest import MODEL_TOL, assert_close
from convert_helpers import fresh, peft_load, peft_vera, save_base
from peft_ref import make_adapter, peft_vera_model
from uora_rt.core import format as fmt
from uora_rt.convert import from_peft

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_converted_vera_adapters_serve_like_peft(tmp_path, kind):
    base = save_base(kind, tmp_path / "base")
    # (The runtime's BERT adapts the encoder only: a bare "dense" would also match pooler.dense.)
    targets = (["q_proj", "v_proj", "down_proj"] if kind == "llama"
               else ["query", "value", "intermediate.dense"])
    peft_vera(kind, tmp_path / "drawn", r=16, targets=targets, seed=3, save_projection=False)
    peft_vera(kind, tmp_path / "saved", r=8, targets=targets[:2], seed=0, lam_seed=2)
    drawn = from_peft(tmp_path / "drawn", tmp_path / "drawn.uora", base=base)
    saved = from_peft(tmp_path / "saved", tmp_path / "saved.uora", base=base)
    assert drawn.projection.algorithm == fmt.PEFT_VERA_ALGORITHM
    assert saved.projection.algorithm == fmt.EXPLICIT_ALGORITHM
    ours = make_adapter(lambda: fresh(kind), tmp_path / "uora.uora", targets=targets[:2],
                        reinit=True)
    rt = uora_rt.load(base, adapters=[("drawn", tmp_path / "drawn.uora"),
                                      ("saved", tmp_path / "saved.uora"), ("uora", ours)])
    ids = torch.randint(0, 97, (4, 9), generator=torch.Generator().manual_seed(0))
    names = ["drawn", "saved", None, "uora"]
    out = rt.forward(ids, torch.ones_like(ids), names)
    got = out.logits if kind == "llama" else out.hidden_states
    refs = {"drawn": peft_load(kind, tmp_path / "drawn"), None: fresh(kind),
            "saved": peft_load(kind, tmp_path / "saved"),
            "uora": peft_vera_model(fresh(kind), ours)}
    for i, name in enumerate(names):
        with torch.no_grad():
            want = refs[name](input_ids=ids[i:i + 1])[0][0].float()
        assert_close(got[i], want, table=MODEL_TOL, msg=str(name))
