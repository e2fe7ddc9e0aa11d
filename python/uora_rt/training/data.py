"""Training data from JSONL files: reading, validation and tokenization.

One format per file, detected from the first row and required of every other row:
    messages            {"messages": [{"role": ..., "content": ...}, ...]}   decoders (chat)
    prompt/completion   {"prompt": ..., "completion": ...}                   decoders (plain text)
    text/label          {"text": ..., "label": int | float}                  encoders
    text pair/label     {"text": ..., "text_pair": ..., "label": int | float} encoders
An int label means classification (classes 0..N-1), a float label regression. Every defect is a
DataError naming the file, the line and what was expected, raised before any training starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = {
    "messages": ("messages",),
    "prompt/completion": ("prompt", "completion"),
    "text/label": ("text", "label"),
    "text pair/label": ("text", "text_pair", "label"),
}
DECODER_FORMATS = ("messages", "prompt/completion")
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training or evaluation data: the message names the file, the line and the problem."""

    def __init__(self, path, line, expected, found):
        self.path, self.line = str(path), line
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: expected {expected}, found {found}")


@dataclass
class Dataset:
    """The validated rows of one JSONL file."""

    path: str
    format: str
    rows: list[dict]
    lines: list[int]                # the 1-based line number of each row
    task: str | None = None         # encoders: "classification" | "regression"
    num_labels: int | None = None   # classification: 1 + the largest label

    @property
    def kind(self) -> str:
        return "decoder" if self.format in DECODER_FORMATS else "encoder"

    def describe(self) -> str:
        what = f"{len(self.rows)} rows, format {self.format}"
        if self.task == "classification":
            return f"{what} (classification, {self.num_labels} classes)"
        return f"{what} (regression)" if self.task == "regression" else what


def _kind_name(v) -> str:
    if isinstance(v, bool):
        return "a boolean"
    return {int: "an int", float: "a float", str: "a string", list: "a list", dict: "an object",
            type(None): "null"}.get(type(v), type(v).__name__)


def _detect(path, line, row: dict) -> str:
    keys = set(row)
    for name, fields in FORMATS.items():
        if keys == set(fields):
            return name
    raise DataError(path, line, "the fields of one of the formats " + "; ".join(
        "{" + ", ".join(f) + "}" for f in FORMATS.values()), f"the fields {sorted(keys)}")


def _check_text(path, line, row, key, allow_empty=False):
    v = row[key]
    if not isinstance(v, str):
        raise DataError(path, line, f'"{key}" as a string', _kind_name(v))
    if not v.strip() and not allow_empty:
        raise DataError(path, line, f'a non-empty "{key}"', "an empty string")


def _check_messages(path, line, row):
    msgs = row["messages"]
    if not isinstance(msgs, list):
        raise DataError(path, line, '"messages" as a list of {"role", "content"} objects',
                        _kind_name(msgs))
    if not msgs:
        raise DataError(path, line, "at least one message", "empty messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            found = sorted(m) if isinstance(m, dict) else _kind_name(m)
            raise DataError(path, line, f'message {i} as an object with exactly "role" and '
                                        f'"content"', found)
        if m["role"] not in ROLES:
            raise DataError(path, line, f"message {i}'s role in {list(ROLES)}", repr(m["role"]))
        if not isinstance(m["content"], str):
            raise DataError(path, line, f"message {i}'s content as a string",
                            _kind_name(m["content"]))
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(path, line, "an assistant message (the loss is on assistant turns)",
                        "none")


def _check_label(path, line, row, first_kind, first_line):
    v = row["label"]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(path, line, '"label" as an int (a class) or a float (a score)',
                        _kind_name(v))
    if isinstance(v, float) and not math.isfinite(v):
        raise DataError(path, line, "a finite label", repr(v))
    kind = "int" if isinstance(v, int) else "float"
    if first_kind is not None and kind != first_kind:
        task = "classification" if first_kind == "int" else "regression"
        raise DataError(path, line, f"{'an int' if first_kind == 'int' else 'a float'} label like "
                        f"line {first_line}'s (this file is {task}; one label type per file"
                        f"{', write 5.0 for 5' if first_kind == 'float' else ''})",
                        f"{_kind_name(v)} label {v!r}")
    if kind == "int" and v < 0:
        raise DataError(path, line, "a class label >= 0", v)
    return kind


def read_jsonl(path, kind: str | None = None, base_name: str = "this base") -> Dataset:
    """Reads and validates one JSONL file (blank lines are allowed and skipped). kind: "decoder"
    or "encoder" to refuse the other kind's formats at the first row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, 0, "a JSONL file", "no such file")
    rows, lines, fmt_name, first = [], [], None, None
    label_kind, label_line = None, None
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, number, "UTF-8 text",
                                f"undecodable bytes ({e.reason})") from None
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(path, number, "one JSON object per line",
                                f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(path, number, "a JSON object", _kind_name(row))
            if fmt_name is None:
                fmt_name, first = _detect(path, number, row), number
                found_kind = "decoder" if fmt_name in DECODER_FORMATS else "encoder"
                if kind is not None and found_kind != kind:
                    want = (DECODER_FORMATS if kind == "decoder" else
                            tuple(f for f in FORMATS if f not in DECODER_FORMATS))
                    article = "an" if kind == "encoder" else "a"
                    raise DataError(path, number, f"{article} {kind} format {list(want)} "
                                    f"({base_name} is {article} {kind})", f"format {fmt_name}")
            elif set(row) != set(FORMATS[fmt_name]):
                missing = sorted(set(FORMATS[fmt_name]) - set(row))
                extra = sorted(set(row) - set(FORMATS[fmt_name]))
                found = (f"missing {missing}" if missing else "") + (
                    f"{'; ' if missing else ''}unknown {extra}" if extra else "")
                raise DataError(path, number, f"the fields {list(FORMATS[fmt_name])} (format "
                                              f"{fmt_name}, detected from line {first})", found)
            if fmt_name == "messages":
                _check_messages(path, number, row)
            elif fmt_name == "prompt/completion":
                _check_text(path, number, row, "prompt", allow_empty=True)
                _check_text(path, number, row, "completion")
            else:
                _check_text(path, number, row, "text")
                if "text_pair" in row:
                    _check_text(path, number, row, "text_pair")
                kind = _check_label(path, number, row, label_kind, label_line)
                if label_kind is None:
                    label_kind, label_line = kind, number
            rows.append(row)
            lines.append(number)
    if not rows:
        raise DataError(path, 0, "at least one row", "an empty file")
    data = Dataset(str(path), fmt_name, rows, lines)
    if data.kind == "encoder":
        data.task = "classification" if label_kind == "int" else "regression"
        if data.task == "classification":
            data.num_labels = max(r["label"] for r in rows) + 1
            seen = {r["label"] for r in rows}
            if len(seen) < 2:
                raise DataError(path, 0, "at least two different class labels",
                                f"only label {rows[0]['label']}")
    return data


def check_eval_matches(train: Dataset, evald: Dataset) -> None:
    """An evaluation file must have the training file's format, task and label range."""
    if evald.format != train.format:
        raise DataError(evald.path, evald.lines[0], f"format {train.format} like {train.path}",
                        f"format {evald.format}")
    if evald.task != train.task:
        raise DataError(evald.path, evald.lines[0], f"{train.task} labels like {train.path}",
                        f"{evald.task} labels")
    if train.task == "classification":
        for row, line in zip(evald.rows, evald.lines):
            if row["label"] >= train.num_labels:
                raise DataError(evald.path, line, f"a label below {train.num_labels} (the classes "
                                f"of {train.path})", row["label"])


# ---------------------------------------------------------------------------- tokenization


@dataclass
class Encoded:
    """One tokenized row. Decoders: ids and which tokens are targets (loss); encoders: ids, token
    types and the label."""

    ids: list[int]
    line: int
    target_mask: list[bool] | None = None
    types: list[int] | None = None
    label: int | float | None = None


@dataclass
class Encoding:
    examples: list[Encoded]
    truncated: int = 0           # rows cut to max_len
    no_target: list[int] = field(default_factory=list)  # lines left with no target token

    def warning(self, path: str, max_len: int) -> str | None:
        if not self.truncated:
            return None
        msg = (f"warning: {self.truncated} of {len(self.examples)} rows of {path} are longer than "
               f"--max-len {max_len} tokens and were truncated")
        if self.no_target:
            msg += (f"; {len(self.no_target)} of them kept no answer token and add nothing to the "
                    f"loss (first at line {self.no_target[0]})")
        return msg


def _render_segments(codec, messages, path, line) -> list[tuple[str, bool]]:
    """The chat template's text split into (segment, is_target) pieces: each assistant turn (its
    content and end marker) is a target, everything the template writes before it is not."""
    def render(msgs, gen):
        try:
            return codec.render_chat(msgs, add_generation_prompt=gen)
        except Exception as e:  # the template's own raise_exception, or a jinja error
            raise DataError(path, line, "messages the chat template accepts", str(e)) from None

    full = render(messages, False)
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], True)
        after = render(messages[: i + 1], False)
        if not (before.startswith(done) and after.startswith(before) and full.startswith(after)):
            raise DataError(path, line, "a chat template that renders each conversation as a "
                            "prefix of the next", "one that rewrites earlier turns")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    if full[len(done):]:
        pieces.append((full[len(done):], False))
    return pieces


def encode_decoder(data: Dataset, codec, max_len: int) -> Encoding:
    """messages: through the chat template, loss on assistant turns; prompt/completion: plain
    text (as a completions request sends it), loss on the completion and the end token."""
    out = Encoding([])
    tok = codec.tok
    for row, line in zip(data.rows, data.lines):
        ids, mask = [], []
        if data.format == "messages":
            for text, target in _render_segments(codec, row["messages"], data.path, line):
                piece = tok.encode(text, add_special_tokens=False).ids
                ids += piece
                mask += [target] * len(piece)
        else:
            prompt = tok.encode(row["prompt"]).ids if row["prompt"] else []
            answer = tok.encode(row["completion"], add_special_tokens=False).ids
            if codec.eos_id is not None:
                answer.append(codec.eos_id)
            ids, mask = prompt + answer, [False] * len(prompt) + [True] * len(answer)
        if len(ids) > max_len:
            out.truncated += 1
            ids, mask = ids[:max_len], mask[:max_len]
        if not any(mask[1:]):  # the first token has no prediction before it
            out.no_target.append(line)
        out.examples.append(Encoded(ids, line, target_mask=mask))
    if len(out.no_target) == len(out.examples):
        raise DataError(data.path, out.no_target[0], f"answer tokens within --max-len {max_len}",
                        "no row with an answer token left after truncation")
    return out


def encode_encoder(data: Dataset, tok, max_len: int) -> Encoding:
    out = Encoding([])
    for row, line in zip(data.rows, data.lines):
        enc = tok.encode(row["text"], row.get("text_pair"))
        if enc.overflowing:
            out.truncated += 1
        out.examples.append(Encoded(list(enc.ids), line, types=list(enc.type_ids),
                                    label=row["label"]))
    return out
