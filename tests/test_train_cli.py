"""`uora-rt train` and `uora-rt eval` end to end on tiny bases, checked against independent
computations: transformers' forward with the adapter loaded through `uora_rt.load_adapter`, the
targets built from the chat text by hand, and scikit-learn's metrics."""

import json

import pytest
import torch

import uora_rt
from conftest import requires_minilm
from train_helpers import (chat_rows, decoder_base, encoder_base, sentiment_rows, write_jsonl)
from uora_rt.cli import main
from uora_rt.core import format as fmt


@pytest.fixture(scope="module")
def dec_base(tmp_path_factory):
    return decoder_base(tmp_path_factory.mktemp("dec") / "base")


@pytest.fixture(scope="module")
def enc_base(tmp_path_factory):
    return encoder_base(tmp_path_factory.mktemp("enc") / "base")


def run(capsys, *argv):
    argv = [str(a) for a in argv]
    if argv[0] in ("train", "eval") and "--device" not in argv:
        argv += ["--device", "cpu"]  # the references run in float32 on the CPU (GPU: below)
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_decoder_round_trip_matches_transformers(dec_base, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(24))
    out = tmp_path / "chat.uora"
    code, stdout, stderr = run(capsys, "train", dec_base, "--data", data, "--output", out,
                               "--eval-data", data, "--r", 16, "--epochs", 3, "--lr", 0.05,
                               "--quiet", "--batch-size", 8, "--seed", 3)
    assert code == 0, stderr
    assert "format messages" in stderr and "trained 9 steps" in stdout
    assert "reinit events" in stdout and "trainable adapter parameters" in stdout
    assert (tmp_path / "chat.uora.loss.png").read_bytes()[:4] == b"\x89PNG"
    adapter = fmt.load(out)
    assert adapter.head is None and adapter.projection.seed == 3
    assert adapter.training["steps"] == 9
    code, stdout, _ = run(capsys, "eval", dec_base, "--adapter", out, "--data", data)
    assert code == 0
    got = json.loads(stdout)
    # Independent: transformers' Llama with the adapter injected, targets = the assistant text.
    model = LlamaForCausalLM.from_pretrained(dec_base).eval()
    uora_rt.load_adapter(model, out)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(dec_base / "tokenizer.json"))
    nll, count = 0.0, 0
    for row in chat_rows(24):
        user, answer = (m["content"] for m in row["messages"])
        text = f"<s>user: {user}\n<s>assistant: {answer}\n"
        ids = tok.encode(text, add_special_tokens=False).ids
        n = len(answer) + 1  # one token per character, and the template's newline
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        nll += torch.nn.functional.cross_entropy(logits[-n - 1:-1], torch.tensor(ids[-n:]),
                                                 reduction="sum").item()
        count += n
    assert got["tokens"] == count
    assert got["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert got["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)
    again = json.loads(run(capsys, "eval", dec_base, "--adapter", out, "--data", data)[1])
    assert again == got  # deterministic
    # The serving runtime (what `uora-rt serve` runs) gives the trained adapter's logits.
    rt = uora_rt.load(dec_base, adapters=[("chat", out)])
    served = rt.forward(torch.tensor([ids]), adapters=["chat"]).logits[0]
    with torch.no_grad():
        torch.testing.assert_close(served, model(torch.tensor([ids])).logits[0], atol=2e-4,
                                   rtol=2e-4)


def test_prompt_completion_trains_and_learns(dec_base, tmp_path, capsys):
    rows = [{"prompt": f"q{i}=", "completion": "yes"} for i in range(16)]
    data = write_jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "pc.uora"
    before_adapter = tmp_path / "zero.uora"
    code, _, err = run(capsys, "train", dec_base, "--data", data, "--output", before_adapter,
                       "--r", 16, "--max-steps", 1, "--lr", 1e-9, "--quiet", "--no-plot")
    assert code == 0, err
    code, stdout, err = run(capsys, "train", dec_base, "--data", data, "--output", out, "--r", 16,
                            "--max-steps", 30, "--lr", 0.1, "--quiet", "--no-plot",
                            "--target-modules", "q_proj, v_proj,down_proj")
    assert code == 0, err
    assert "format prompt/completion" in err and "'down_proj']" in err
    assert not (tmp_path / "pc.uora.loss.png").exists()
    before = json.loads(run(capsys, "eval", dec_base, "--adapter", before_adapter, "--data",
                            data)[1])
    after = json.loads(run(capsys, "eval", dec_base, "--adapter", out, "--data", data)[1])
    assert after["tokens"] == 16 * 4  # "yes" and the end token
    assert after["loss"] < before["loss"] - 0.3
    assert len(fmt.load(out).targets) == 6


def _sklearn_accuracy(enc_base, adapter_path, rows):
    """Accuracy through transformers' BertModel + load_adapter + the file's head, by hand."""
    from sklearn.metrics import accuracy_score
    from tokenizers import Tokenizer
    from transformers import BertModel

    model = BertModel.from_pretrained(enc_base, add_pooling_layer=False).eval()
    uora_rt.load_adapter(model, adapter_path)
    head = fmt.load(adapter_path).head
    tok = Tokenizer.from_file(str(enc_base / "tokenizer.json"))
    preds = []
    for r in rows:
        e = tok.encode(r["text"], r.get("text_pair"))
        with torch.no_grad():
            h = model(input_ids=torch.tensor([e.ids]),
                      token_type_ids=torch.tensor([e.type_ids])).last_hidden_state[0]
        preds.append(int((h.mean(0) @ head.weight.T + head.bias).argmax()))
    return accuracy_score([r["label"] for r in rows], preds)


def test_encoder_round_trip_with_head(enc_base, tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(64, seed=0))
    val_rows = sentiment_rows(32, seed=1)
    val = write_jsonl(tmp_path / "val.jsonl", val_rows)
    out = tmp_path / "cls.uora"
    code, stdout, err = run(capsys, "train", enc_base, "--data", train, "--eval-data", val,
                            "--output", out, "--r", 16, "--epochs", 2, "--quiet",
                            "--head-lr", 1e-2)
    assert code == 0, err
    assert "text/label (classification, 2 classes)" in err and "+ 130 head" in stdout
    adapter = fmt.load(out)
    assert adapter.head.task == "classification" and adapter.head.pooling == "mean"
    assert list(adapter.head.weight.shape) == [2, 64]
    code, stdout, _ = run(capsys, "inspect", out)
    assert "head         classification, mean pooling, 2 output(s) from 64 features" in stdout
    assert "head.weight   [2, 64]" in stdout and "head.bias     [2]" in stdout
    got = json.loads(run(capsys, "eval", enc_base, "--adapter", out, "--data", val)[1])
    assert set(got) >= {"accuracy", "f1", "mcc", "loss"}
    assert got["accuracy"] == pytest.approx(_sklearn_accuracy(enc_base, out, val_rows), abs=1e-9)


def test_encoder_pairs_regression(enc_base, tmp_path, capsys):
    from scipy.stats import pearsonr

    rows = [{"text": "ab" * (i % 5 + 1), "text_pair": "cd" * (i % 3 + 1), "label": float(i % 5)}
            for i in range(40)]
    data = write_jsonl(tmp_path / "sts.jsonl", rows)
    out = tmp_path / "sts.uora"
    code, stdout, err = run(capsys, "train", enc_base, "--data", data, "--output", out, "--r", 8,
                            "--max-steps", 6, "--quiet", "--no-plot")
    assert code == 0, err and "(regression)" in err
    head = fmt.load(out).head
    assert head.task == "regression" and head.outputs == 1
    got = json.loads(run(capsys, "eval", enc_base, "--adapter", out, "--data", data)[1])
    assert set(got) >= {"pearson", "spearman", "mse", "loss"} and "accuracy" not in got
    # Independent prediction: transformers + load_adapter + the head, with token types.
    from tokenizers import Tokenizer
    from transformers import BertModel

    model = BertModel.from_pretrained(enc_base, add_pooling_layer=False).eval()
    uora_rt.load_adapter(model, out)
    tok = Tokenizer.from_file(str(enc_base / "tokenizer.json"))
    preds = []
    for r in rows:
        e = tok.encode(r["text"], r["text_pair"])
        assert 1 in e.type_ids
        with torch.no_grad():
            h = model(input_ids=torch.tensor([e.ids]),
                      token_type_ids=torch.tensor([e.type_ids])).last_hidden_state[0]
        preds.append(float(h.mean(0) @ head.weight[0] + head.bias[0]))
    assert got["pearson"] == pytest.approx(pearsonr(preds, [r["label"] for r in rows])[0],
                                           abs=1e-5)


def test_save_adapter_takes_every_training_result(dec_base, tmp_path):
    from uora_rt.training.pipeline import TrainOptions, train
    from uora_rt.training.pipeline import train_chat_adapter

    rt = uora_rt.load(dec_base)
    chat = train_chat_adapter(rt, [("hi", "yo")] * 4, uora_rt.UORAConfig(r=8), steps=2,
                              batch_size=2)
    uora_rt.save_adapter(chat, tmp_path / "chat.uora")
    assert fmt.load(tmp_path / "chat.uora").r == 8
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    result = train(TrainOptions(base=str(dec_base), data=str(data), output=str(tmp_path / "x"),
                                r=8, max_steps=2, progress=False), log=lambda m: None)
    uora_rt.save_adapter(result, tmp_path / "pipeline.uora")
    assert fmt.load(tmp_path / "pipeline.uora").training["steps"] == 2
    with pytest.raises(TypeError, match="save_adapter: expected"):
        uora_rt.save_adapter(object(), tmp_path / "bad.uora")


def test_failed_write_leaves_no_file(dec_base, tmp_path, capsys, monkeypatch):
    import os

    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    out = tmp_path / "out.uora"
    out.write_bytes(b"previous contents")

    def broken_replace(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="simulated"):
        main(["train", str(dec_base), "--data", str(data), "--output", str(out), "--r", "8",
              "--max-steps", "1", "--quiet", "--no-plot"])
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "out.uora"]


def test_failure_during_training_writes_nothing(dec_base, tmp_path, monkeypatch):
    from uora_rt.training import pipeline

    def explode(*a, **k):
        raise RuntimeError("interrupted (simulated)")

    monkeypatch.setattr(pipeline, "fit", explode)
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(4))
    with pytest.raises(RuntimeError, match="simulated"):
        main(["train", str(dec_base), "--data", str(data), "--output", str(tmp_path / "o.uora"),
              "--quiet", "--r", "8"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


@pytest.mark.slow
@requires_minilm
def test_minilm_cli_round_trip(tmp_path, capsys):
    rows = [{"text": t, "label": y} for t, y in [("a wonderful, moving film", 1),
                                                  ("dull and far too long", 0)] * 8]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "m.uora"
    code, stdout, err = run(capsys, "train", "minilm", "--data", data, "--output", out,
                            "--max-steps", 3, "--quiet", "--no-plot", "--r", 32)
    assert code == 0, err
    assert fmt.load(out).head.hidden == 384
    got = json.loads(run(capsys, "eval", "minilm", "--adapter", out, "--data", data)[1])
    assert 0.0 <= got["accuracy"] <= 1.0 and got["rows"] == 16


def test_bf16_autocast_path_on_cpu(dec_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(8))
    out = tmp_path / "bf16.uora"
    code, stdout, err = run(capsys, "train", dec_base, "--data", data, "--output", out, "--r", 8,
                            "--max-steps", 2, "--dtype", "bfloat16", "--quiet", "--no-plot")
    assert code == 0, err
    assert "bf16 autocast" in err
    adapter = fmt.load(out)
    assert all(t.dtype == torch.float32 for t in adapter.lambda_b.values())
    assert any(bool(t.abs().sum() > 0) for t in adapter.lambda_b.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_and_eval_on_cuda(dec_base, enc_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(16))
    out = tmp_path / "gpu.uora"
    code, stdout, err = run(capsys, "train", dec_base, "--data", data, "--output", out, "--r", 16,
                            "--max-steps", 4, "--quiet", "--no-plot", "--eval-data", data,
                            "--device", "cuda")
    assert code == 0, err
    assert "on cuda, bf16 autocast" in err and "on cuda" in stdout
    gpu = json.loads(run(capsys, "eval", dec_base, "--adapter", out, "--data", data,
                         "--dtype", "float32", "--device", "cuda")[1])
    cpu = json.loads(run(capsys, "eval", dec_base, "--adapter", out, "--data", data,
                         "--device", "cpu")[1])
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
    rows = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(32))
    code, _, err = run(capsys, "train", enc_base, "--data", rows, "--output", tmp_path / "e.uora",
                       "--r", 8, "--max-steps", 3, "--quiet", "--no-plot", "--device", "cuda")
    assert code == 0, err
