"""Tiny bases on disk for the training-command tests: the server tests' character-level Llama
(with a chat template) and a character-level BERT with sentence-transformers mean pooling."""

import json
from pathlib import Path

from models_tiny import tiny_bert
from server_helpers import CHARS, tiny_base


def decoder_base(folder: Path) -> Path:
    return tiny_base(folder)


def encoder_base(folder: Path) -> Path:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
    for c in CHARS[:93]:  # 97 tokens in all: tiny_bert's vocabulary
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    tiny_bert().save_pretrained(folder)
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}))
    return folder


def write_jsonl(path: Path, rows, raw_lines=()) -> Path:
    lines = [json.dumps(r) for r in rows] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def chat_rows(n, style="ARR"):
    return [{"messages": [{"role": "user", "content": f"say {i}"},
                          {"role": "assistant", "content": f"{style} {i % 7}!"}]} for i in range(n)]


def sentiment_rows(n, seed=0):
    """A task a tiny model can learn from characters: label 1 iff the text has an 'x'."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = "".join(rng.choice("abcdefg") for _ in range(rng.randrange(3, 9)))
        rows.append({"text": (word + "x" + word[::-1]) if label else word, "label": label})
    return rows
