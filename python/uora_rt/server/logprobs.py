"""Logprobs in OpenAI's two response shapes, from the engine's TokenLogprob entries.

A token's text is what the tokenizer decodes it to alone (special tokens included); where that
is not valid UTF-8 (a piece of a multi-byte character), the text is `bytes:\\xNN...` and
`bytes` holds the raw bytes, as OpenAI answers. Logprobs of -inf are sent as -9999.0 (JSON has
no infinity), as vLLM does.
"""

from __future__ import annotations

import json
import math
import re

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Token id -> (text, bytes), cached (a server asks for the same ids over and over)."""

    def __init__(self, codec):
        self.tok = codec.tok
        self._cache: dict[int, tuple[str, list[int]]] = {}
        try:
            decoder = json.loads(self.tok.to_str()).get("decoder") or {}
        except ValueError:
            decoder = {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)
        self._bytes = _byte_decoder() if self._byte_level else {}

    def raw(self, tid: int) -> bytes | None:
        piece = self.tok.id_to_token(tid)
        if piece is None:
            return None
        m = _BYTE_TOKEN.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        if self._byte_level and all(c in self._bytes for c in piece):
            return bytes(self._bytes[c] for c in piece)
        return None

    def __call__(self, tid: int) -> tuple[str, list[int]]:
        hit = self._cache.get(tid)
        if hit is None:
            text = self.tok.decode([tid], skip_special_tokens=False)
            raw = self.raw(tid) if "\ufffd" in text else None
            if raw is not None and not _utf8(raw):
                hit = "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)
            else:
                hit = text, list(text.encode("utf-8", "backslashreplace"))
            self._cache[tid] = hit
        return hit


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _lp(v: float) -> float:
    return max(v, -9999.0) if not math.isnan(v) else -9999.0


def completion_logprobs(texts: TokenTexts, ids: list[int], entries: list, k: int,
                        offset: int = 0) -> dict:
    """The legacy shape for tokens `ids` with their entries (None: the first prompt token);
    top_logprobs hold the k best and the chosen token. offset: characters of text before the
    first of these tokens."""
    out = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for tid, e in zip(ids, entries):
        text = texts(tid)[0]
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(e.logprob))
        top = {texts(t)[0]: _lp(v) for t, v in e.top[:k]}
        top.setdefault(text, _lp(e.logprob))
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(texts: TokenTexts, entries: list, k: int) -> dict:
    """The chat shape: per output token its text, logprob, bytes and its k best alternatives."""
    content = []
    for e in entries:
        text, raw = texts(e.token_id)
        top = []
        for t, v in e.top[:k]:
            tt, tb = texts(t)
            top.append({"token": tt, "logprob": _lp(v), "bytes": tb})
        content.append({"token": text, "logprob": _lp(e.logprob), "bytes": raw,
                        "top_logprobs": top})
    return {"content": content, "refusal": None}
