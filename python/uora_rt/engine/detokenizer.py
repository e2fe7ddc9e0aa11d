"""Incremental detokenization and stop strings: work per token is O(1), never O(length so far).

tokenizers' DecodeStream turns one token id at a time into text (holding back bytes that do not
form a character yet); its pieces concatenate to tokenizer.decode(all ids). Stop strings are
searched only in the new piece plus the last len(stop) - 1 characters before it, and streamed
text lags by that much, so a stop string that spans pieces is never half-streamed.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class Detokenizer:
    def __init__(self, codec, stop: list[str]):
        self.codec, self.stop = codec, stop
        self.stream = DecodeStream(skip_special_tokens=True) if codec is not None else None
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text already handed out as new text
        self.matched: str | None = None  # the stop string that ended the text

    def push(self, token: int) -> bool:
        """Appends one generated token; True when the text now contains a stop string (the text
        is cut before it)."""
        if self.stream is None:
            return False
        piece = self.stream.step(self.codec.tok, token)
        if not piece:
            return False
        start = len(self.text)
        self.text += piece
        if self.stop:
            lo = max(0, start - self.hold)
            hits = [(i, s) for i, s in ((self.text.find(s, lo), s) for s in self.stop) if i >= 0]
            if hits:
                cut, self.matched = min(hits, key=lambda h: h[0])
                self.text = self.text[:cut]
                return True
        return False

    def take_new(self, finished: bool) -> str:
        """Text not handed out yet: all of it once finished, else all but the held-back tail."""
        end = len(self.text) if finished else max(self.sent, len(self.text) - self.hold)
        new, self.sent = self.text[self.sent:end], end
        return new
