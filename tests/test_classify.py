"""Runtime.classify: an encoder's predictions through the task heads stored in its adapters, a
mixed batch (classification and regression adapters, sentence pairs) in one call, against an
independent computation per text: transformers' BertModel with the adapter loaded through
`uora_rt.load_adapter`, then the file's head by hand."""

import pytest
import torch

import uora_rt
from models_tiny import tiny_llama
from train_helpers import encoder_base, sentiment_rows, write_jsonl
from uora_rt.cli import main
from uora_rt.core import format as fmt


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("classify")
    base = encoder_base(d / "base")
    cls = d / "cls.uora"
    assert main(["train", str(base), "--data", str(write_jsonl(d / "cls.jsonl",
                 sentiment_rows(48))), "--output", str(cls), "--r", "16", "--max-steps", "6",
                 "--quiet", "--no-plot", "--device", "cpu"]) == 0
    pairs = [{"text": "ab" * (i % 5 + 1), "text_pair": "cd" * (i % 3 + 1),
              "label": float(i % 5)} for i in range(32)]
    sts = d / "sts.uora"
    assert main(["train", str(base), "--data", str(write_jsonl(d / "sts.jsonl", pairs)),
                 "--output", str(sts), "--r", "8", "--max-steps", "4", "--quiet", "--no-plot",
                 "--seed", "3", "--device", "cpu"]) == 0
    return base, cls, sts


def _reference(base, adapter_path, text, pair=None):
    """The head's raw outputs for one text: transformers + load_adapter + mean pooling."""
    from tokenizers import Tokenizer
    from transformers import BertModel

    model = BertModel.from_pretrained(base, add_pooling_layer=False).eval()
    uora_rt.load_adapter(model, adapter_path)
    head = fmt.load(adapter_path).head
    e = Tokenizer.from_file(str(base / "tokenizer.json")).encode(text, pair)
    with torch.no_grad():
        h = model(input_ids=torch.tensor([e.ids]),
                  token_type_ids=torch.tensor([e.type_ids])).last_hidden_state[0]
    return h.mean(0) @ head.weight.T + head.bias


def test_a_mixed_batch_matches_transformers_per_text(trained):
    base, cls, sts = trained
    rt = uora_rt.load(base, adapters=[("sentiment", cls), ("similarity", sts)])
    texts = ["a fine x film", "abab", "dull", "ababab", "x marks"]
    pairs = [None, "cdcd", None, "cd", None]
    names = ["sentiment", "similarity", "sentiment", "similarity", "sentiment"]
    got = rt.classify(texts, names, text_pairs=pairs)
    for g, text, pair, name in zip(got, texts, pairs, names):
        ref = _reference(base, cls if name == "sentiment" else sts, text, pair)
        assert g["adapter"] == name
        if name == "sentiment":
            probs = torch.softmax(ref, -1)
            assert g["label"] == int(probs.argmax())
            assert g["probabilities"] == pytest.approx(probs.tolist(), abs=1e-5)
        else:
            assert set(g) == {"adapter", "value"}
            assert g["value"] == pytest.approx(float(ref[0]), abs=1e-5)


def test_one_name_for_every_text_and_a_single_text(trained):
    base, cls, _ = trained
    rt = uora_rt.load(base, adapters=[("sentiment", cls)])
    many = rt.classify(["xx", "yy"], "sentiment")
    assert [m["label"] for m in many] == [rt.classify(t, "sentiment")[0]["label"]
                                          for t in ("xx", "yy")]


def test_clear_errors(trained, tmp_path):
    base, cls, _ = trained
    rt = uora_rt.load(base, adapters=[("sentiment", cls)])
    plain = fmt.load(cls)
    plain.head = None
    rt.add_adapter(plain, "headless")
    with pytest.raises(ValueError, match="'headless' has no task head"):
        rt.classify(["x"], ["headless"])
    with pytest.raises(ValueError, match="'nope' not loaded"):
        rt.classify(["x"], ["nope"])
    with pytest.raises(ValueError, match="2 texts, 1 adapters"):
        rt.classify(["x", "y"], ["sentiment"])
    rt.remove_adapter("sentiment")
    with pytest.raises(ValueError, match="'sentiment' not loaded"):
        rt.classify(["x"], "sentiment")
    with pytest.raises(ValueError, match="only encoders have token types"):
        uora_rt.Runtime.random(tiny_llama().config.to_dict()).forward(
            [[1, 2]], token_type_ids=[[0, 0]])
