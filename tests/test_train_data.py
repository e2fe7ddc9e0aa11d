"""Bad training data: a clear error naming the file, the line and what was expected, exit code 2,
nothing written, before any training starts."""

import json

import pytest

from train_helpers import chat_rows, decoder_base, encoder_base, sentiment_rows, write_jsonl
from uora_rt.cli import main
from uora_rt.training import data as data_mod

CHAT = json.dumps(chat_rows(1)[0])
TEXT = json.dumps({"text": "fine", "label": 1})


@pytest.fixture(scope="module")
def dec_base(tmp_path_factory):
    return decoder_base(tmp_path_factory.mktemp("dec") / "base")


@pytest.fixture(scope="module")
def enc_base(tmp_path_factory):
    return encoder_base(tmp_path_factory.mktemp("enc") / "base")


BAD_DECODER = [
    ("bad JSON", [CHAT, '{"messages": [}'], 2, "one JSON object per line", "invalid JSON"),
    ("not an object", [CHAT, "[1, 2]"], 2, "a JSON object", "a list"),
    ("missing field", ['{"prompt": "a", "completion": "b"}', '{"prompt": "a"}'], 2,
     "the fields ['prompt', 'completion']", "missing ['completion']"),
    ("unknown field", [CHAT, json.dumps({**chat_rows(1)[0], "id": 3})], 2,
     "detected from line 1", "unknown ['id']"),
    ("empty messages", [CHAT, '{"messages": []}'], 2, "at least one message", "empty messages"),
    ("no assistant", [CHAT, '{"messages": [{"role": "user", "content": "hi"}]}'], 2,
     "an assistant message", "none"),
    ("bad role", ['{"messages": [{"role": "robot", "content": "x"}]}'], 1, "role in", "'robot'"),
    ("content not a string", ['{"messages": [{"role": "assistant", "content": 5}]}'], 1,
     "content as a string", "an int"),
    ("empty completion", ['{"prompt": "a", "completion": ""}'], 1, 'a non-empty "completion"',
     "an empty string"),
    ("unknown format", ['{"question": "a", "answer": "b"}'], 1, "one of the formats",
     "['answer', 'question']"),
    ("not UTF-8", [CHAT, b"\xff\xfe".decode("latin-1")], 2, "UTF-8 text", "undecodable"),
    ("encoder rows for a decoder", [TEXT], 1, "a decoder format", "format text/label"),
]

BAD_ENCODER = [
    ("label type changes", [TEXT, TEXT, '{"text": "meh", "label": 0.5}'], 3,
     "an int label like line 1's (this file is classification", "a float label 0.5"),
    ("regression then int", ['{"text": "a", "label": 0.5}', '{"text": "b", "label": 5}'], 2,
     "write 5.0 for 5", "an int label 5"),
    ("boolean label", ['{"text": "a", "label": true}'], 1, "an int (a class)", "a boolean"),
    ("string label", ['{"text": "a", "label": "pos"}'], 1, "an int (a class)", "a string"),
    ("negative label", [TEXT, '{"text": "a", "label": -1}'], 2, "a class label >= 0", "-1"),
    ("one class", [TEXT, TEXT], 0, "at least two different class labels", "only label 1"),
    ("missing text_pair", ['{"text": "a", "text_pair": "b", "label": 1}', TEXT], 2,
     "the fields ['text', 'text_pair', 'label']", "missing ['text_pair']"),
    ("NaN label", ['{"text": "a", "label": NaN}'], 1, "a finite label", "nan"),
    ("chat rows for an encoder", [CHAT], 1, "an encoder format", "format messages"),
]


def _check(base, tmp_path, capsys, lines, line, expected, found):
    path = tmp_path / "bad.jsonl"
    encoding = "latin-1" if "\xff" in lines[-1] else "utf-8"
    path.write_bytes(("\n".join(lines) + "\n").encode(encoding))
    out = tmp_path / "out.uora"
    code = main(["train", str(base), "--data", str(path), "--output", str(out), "--r", "8",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    where = f"{path}:{line}:" if line else f"{path}:"
    assert where in err and expected in err and found in err, err
    assert "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


@pytest.mark.parametrize("case", BAD_DECODER, ids=[c[0] for c in BAD_DECODER])
def test_bad_decoder_data(dec_base, tmp_path, capsys, case):
    _check(dec_base, tmp_path, capsys, *case[1:])


@pytest.mark.parametrize("case", BAD_ENCODER, ids=[c[0] for c in BAD_ENCODER])
def test_bad_encoder_data(enc_base, tmp_path, capsys, case):
    _check(enc_base, tmp_path, capsys, *case[1:])


def test_empty_file_and_missing_file(dec_base, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("\n  \n")
    _check(dec_base, tmp_path, capsys, ["", " "], 0, "at least one row", "an empty file")
    code = main(["train", str(dec_base), "--data", str(tmp_path / "nope.jsonl"), "--output",
                 str(tmp_path / "o.uora")])
    assert code == 2 and "nope.jsonl: expected a JSONL file, found no such file" in \
        capsys.readouterr().err


def test_eval_data_must_match(enc_base, tmp_path, capsys):
    train = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(8))
    bad = write_jsonl(tmp_path / "e.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    code = main(["train", str(enc_base), "--data", str(train), "--eval-data", str(bad),
                 "--output", str(tmp_path / "o.uora"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{bad}:2: expected a label below 2" in err
    assert not (tmp_path / "o.uora").exists()


def test_long_rows_truncated_with_one_warning(dec_base, enc_base, tmp_path, capsys):
    rows = chat_rows(6) + [{"messages": [{"role": "user", "content": "x" * 80},
                                         {"role": "assistant", "content": "ok"}]}] * 2
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    code = main(["train", str(dec_base), "--data", str(data), "--output", str(tmp_path / "a.uora"),
                 "--r", "8", "--max-steps", "1", "--max-len", "40", "--quiet", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert err.count("warning:") == 1
    assert "2 of 8 rows" in err and "--max-len 40" in err and "kept no answer token" in err
    enc_rows = [{"text": "a" * 50, "text_pair": "b" * 50, "label": 1}, {"text": "a", "text_pair":
                "b", "label": 0}, {"text": "c" * 30, "text_pair": "d", "label": 0}]
    data = write_jsonl(tmp_path / "enc.jsonl", enc_rows)
    code = main(["train", str(enc_base), "--data", str(data), "--output", str(tmp_path / "b.uora"),
                 "--r", "8", "--max-steps", "1", "--max-len", "32", "--quiet", "--no-plot"])
    err = capsys.readouterr().err
    assert code == 0, err and "2 of 3 rows" in err


def test_every_row_truncated_away_is_an_error(dec_base, tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": "x" * 80},
                          {"role": "assistant", "content": "ok"}]}]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code = main(["train", str(dec_base), "--data", str(data), "--output",
                 str(tmp_path / "o.uora"), "--max-len", "20"])
    err = capsys.readouterr().err
    assert code == 2 and f"{data}:1: expected answer tokens within --max-len 20" in err
    assert "no row with an answer token left" in err and not (tmp_path / "o.uora").exists()


def test_blank_lines_are_skipped_and_lines_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(TEXT + "\n\n" + '{"text": "x", "label": 0}\n\n')
    ds = data_mod.read_jsonl(path)
    assert ds.lines == [1, 3] and ds.task == "classification" and ds.num_labels == 2
    path.write_text(TEXT + "\n\n" + '{"text": "x", "label": 0.5}\n')
    with pytest.raises(data_mod.DataError, match=r"d.jsonl:3: expected an int label"):
        data_mod.read_jsonl(path)


def test_bad_flags(dec_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(2))
    for flags, msg in [(["--r", "0"], "--r must be >= 1"), (["--lr", "-1"], "--lr must be > 0"),
                       (["--device", "cuda:7"] if not __import__("torch").cuda.is_available()
                        else ["--dtype", "int8"], "--d"),
                       (["--r", "100"], "r = 100 > min")]:
        code = main(["train", str(dec_base), "--data", str(data), "--output",
                     str(tmp_path / "o.uora"), "--quiet", *flags])
        assert code == 2, flags
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "o.uora").exists()
    code = main(["train", str(dec_base), "--data", str(data), "--output",
                 str(tmp_path / "no" / "o.uora")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
