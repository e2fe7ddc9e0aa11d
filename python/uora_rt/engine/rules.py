"""The rules a request must meet, in one place: the engine applies them when a request arrives,
and a front end in another process (engine/client.py) applies the same functions before it sends
one, so a client gets the same answer wherever it is checked.

Limits are plain numbers that travel in the core's first message; Prompts is the text side
(tokenizer and chat template), which lives where the text is: beside the engine in one process,
in the front end when the engine core runs in its own.
"""

from __future__ import annotations

from dataclasses import dataclass


class ContextLengthError(ValueError):
    """A request that cannot fit the model's context; field: what to shorten."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Limits:
    vocab: int
    max_model_len: int       # the model's positions
    kv_capacity_tokens: int  # the whole KV cache

    @property
    def max_request_tokens(self) -> int:
        """The most prompt + max_tokens one request may have: the model's positions, or the
        whole KV cache plus one (the last generated token is never cached)."""
        return min(self.max_model_len, self.kv_capacity_tokens + 1)


def check_prompt(ids, limits: Limits) -> list[int]:
    """Token ids a request may carry: a non-empty list of ids in the vocabulary."""
    ids = list(ids)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int)
           or not 0 <= t < limits.vocab]
    if bad:
        raise ValueError(f"prompt: token ids must be integers in [0, {limits.vocab}), got "
                         f"{bad[:5]}")
    if not ids:
        raise ValueError("empty prompt")
    return ids


def check_length(prompt_tokens: int, max_tokens: int, limits: Limits,
                 what: str = "prompt") -> None:
    """A prompt of that many tokens plus max_tokens must fit the model's positions and the KV
    cache; else ContextLengthError, whose field names what to shorten (`what` or
    "max_tokens")."""
    for limit, head in ((limits.max_model_len,
                         f"This model's maximum context length is {limits.max_model_len} "
                         "tokens."),
                        (limits.max_request_tokens,
                         f"The KV cache holds {limits.kv_capacity_tokens} tokens, so one "
                         f"request can have at most {limits.max_request_tokens} (the last "
                         "output token is never cached).")):
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"{head} However, your {what} has {prompt_tokens} tokens (at most "
                f"{limit - 1}, to leave room for one output token).", what)
        if prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"{head} However, you requested {prompt_tokens + max_tokens} tokens "
                f"({prompt_tokens} in the {what}, {max_tokens} in the completion). Please "
                f"reduce the length of the {what} or completion.", "max_tokens")


class Prompts:
    """Text -> token ids for requests: codec is a models.tokenizer.TextCodec or None (a base
    without tokenizer.json takes token ids only)."""

    def __init__(self, codec, limits: Limits):
        self.codec, self.limits = codec, limits

    def _codec(self):
        if self.codec is None:
            raise ValueError("text prompts need a tokenizer; this base has no tokenizer.json: "
                             "send token ids")
        return self.codec

    @property
    def has_chat_template(self) -> bool:
        return self.codec is not None and self.codec.chat_template is not None

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt string as Engine.add_request takes it: through the chat template (as
        generate does) when the tokenizer has one."""
        return check_prompt(self._codec().encode_prompt(text), self.limits)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Plain text -> token ids (the tokenizer's special tokens added or not)."""
        return self._codec().tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Chat messages through the base's chat template -> token ids. ValueError when the
        base has no template or the template refuses the messages."""
        codec = self._codec()
        if codec.chat_template is None:
            raise ValueError("this base has no chat template")
        text = codec.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return codec.tok.encode(text, add_special_tokens=False).ids


class RequestRules:
    """The rules as methods, for whatever holds `limits` and `prompts`: the engine, and the
    handles a server holds on one (engine/client.CoreClient, server/local.LocalEngine). A server
    asks these; it never repeats them."""

    limits: Limits
    prompts: Prompts

    @property
    def vocab(self) -> int:
        return self.limits.vocab

    @property
    def max_request_tokens(self) -> int:
        """The most prompt + max_tokens one request may have (Limits.max_request_tokens)."""
        return self.limits.max_request_tokens

    @property
    def has_chat_template(self) -> bool:
        return self.prompts.has_chat_template

    def encode_prompt(self, text: str) -> list[int]:
        return self.prompts.encode_prompt(text)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.prompts.encode(text, add_special_tokens)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return self.prompts.encode_chat(messages, add_generation_prompt)

    def check_prompt(self, ids) -> list[int]:
        return check_prompt(ids, self.limits)

    def check_length(self, prompt_tokens: int, max_tokens: int, what: str = "prompt") -> None:
        check_length(prompt_tokens, max_tokens, self.limits, what)
