"""The optional task head in `.uora` files: saved and reloaded exactly, shown by inspect, checked
like every other key; files without a head keep their bytes."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import uora_rt
from models_tiny import randomize_lambdas, tiny_bert, tiny_llama
from uora_rt.cli import main
from uora_rt.core import format as fmt
from uora_rt.errors import AdapterFormatError
from uora_rt.training.heads import TaskHead


@pytest.fixture()
def with_head(tmp_path):
    model = tiny_bert()
    uora_rt.inject(model, uora_rt.UORAConfig(r=8, target_modules=["query", "value"]))
    randomize_lambdas(model)
    adapter = uora_rt.to_adapter(model)
    g = torch.Generator().manual_seed(5)
    adapter.head = fmt.Head("classification", "mean", torch.randn(3, 64, generator=g),
                            torch.randn(3, generator=g))
    path = tmp_path / "head.uora"
    fmt.save(adapter, path)
    return path, adapter


def test_head_round_trip_exact(with_head):
    path, adapter = with_head
    got = fmt.load(path)
    assert got.head.task == "classification" and got.head.pooling == "mean"
    assert torch.equal(got.head.weight, adapter.head.weight)
    assert torch.equal(got.head.bias, adapter.head.bias)
    with safe_open(str(path), "pt") as f:  # stored as named tensors, described in the metadata
        assert {"head.weight", "head.bias"} <= set(f.keys())
        assert json.loads(f.metadata()["head"]) == {"task": "classification", "pooling": "mean",
                                                    "hidden": 64, "outputs": 3}
    head = TaskHead.from_record(got.head)
    hidden, valid = torch.randn(2, 5, 64), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()
    pooled = torch.stack([hidden[0, :3].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(head(hidden, valid),
                               pooled @ adapter.head.weight.T + adapter.head.bias)


def test_file_without_head_is_unchanged_when_resaved(tmp_path):
    model = tiny_llama()
    uora_rt.inject(model, uora_rt.UORAConfig(r=16, tau=0.05))
    randomize_lambdas(model, scale=0.1)
    uora_rt.reinit_step(model)
    first = tmp_path / "a.uora"
    uora_rt.save_adapter(model, first)
    again = tmp_path / "b.uora"
    fmt.save(fmt.load(first), again)
    assert again.read_bytes() == first.read_bytes()
    assert fmt.load(first).head is None
    with safe_open(str(first), "pt") as f:
        assert "head" not in f.metadata() and not any(k.startswith("head.") for k in f.keys())


def test_head_file_resaves_identically(with_head, tmp_path):
    path, _ = with_head
    fmt.save(fmt.load(path), tmp_path / "again.uora")
    assert (tmp_path / "again.uora").read_bytes() == path.read_bytes()


def test_inspect_shows_head(with_head, capsys):
    path, _ = with_head
    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["head"]["tensors"] == {"head.weight": [3, 64], "head.bias": [3]}
    assert d["head"]["parameters"] == 3 * 64 + 3


def _rewrite(src, dst, tensors_fn=None, meta_fn=None):
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensors_fn:
        tensors_fn(tensors)
    if meta_fn:
        meta_fn(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _expect(path, key, *fragments):
    with pytest.raises(AdapterFormatError) as info:
        fmt.load(path)
    msg = str(info.value)
    assert str(path) in msg and key in msg, msg
    for frag in fragments:
        assert frag in msg, msg


def _set_head(**kw):
    def edit(meta):
        head = json.loads(meta["head"])
        head.update(kw)
        meta["head"] = json.dumps(head)
    return edit


@pytest.mark.parametrize("edit,key,fragments", [
    (_set_head(task="ranking"), "__metadata__.head.task", ["one of", "'ranking'"]),
    (_set_head(pooling="attention"), "__metadata__.head.pooling", ["one of"]),
    (_set_head(outputs=0), "__metadata__.head.outputs", ["an int >= 1", "0"]),
    (_set_head(task="regression"), "__metadata__.head.outputs", ["1 for a regression head"]),
    (_set_head(outputs=4), "head.weight", ["shape [4, 64]", "[3, 64]"]),
    (_set_head(hidden=32), "head.weight", ["shape [3, 32]"]),
    (lambda m: m.__setitem__("head", "[1, 2]"), "__metadata__.head", ["a JSON dict"]),
    (lambda m: m.__setitem__("head", json.dumps({"task": "classification"})),
     "__metadata__.head", ["exactly the fields"]),
])
def test_bad_head_metadata(with_head, tmp_path, edit, key, fragments):
    path, _ = with_head
    _expect(_rewrite(path, tmp_path / "bad.uora", meta_fn=edit), key, *fragments)


def test_bad_head_tensors(with_head, tmp_path):
    path, _ = with_head
    bad = _rewrite(path, tmp_path / "nan.uora",
                   tensors_fn=lambda t: t["head.weight"].__setitem__((0, 0), float("nan")))
    _expect(bad, "head.weight", "finite values", "NaN")
    bad = _rewrite(path, tmp_path / "gone.uora", tensors_fn=lambda t: t.pop("head.bias"))
    _expect(bad, "head.bias", "missing")
    bad = _rewrite(path, tmp_path / "orphan.uora", meta_fn=lambda m: m.pop("head"))
    _expect(bad, "head.", "a head described in __metadata__.head")
    bad = _rewrite(path, tmp_path / "f16.uora",
                   tensors_fn=lambda t: t.__setitem__("head.bias", t["head.bias"].half()))
    _expect(bad, "head.bias", "dtype torch.float32")
