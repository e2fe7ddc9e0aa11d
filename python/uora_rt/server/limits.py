"""What one request may ask for: the limits (each a `uora-rt serve` flag), checked before any
expensive work (tokenization, the chat template, the engine), each a 400 naming the field."""

from __future__ import annotations

from dataclasses import dataclass, fields


def APIError(*args):
    from uora_rt.server.errors import APIError as error

    return error(*args)


@dataclass
class Limits:
    """None for max_prompt_chars: 32 characters per position of the model's context;
    None for max_tokens: the model's context (the context-length check applies anyway)."""

    max_body_bytes: int = 8 * 2**20
    max_json_depth: int = 32
    max_prompt_chars: int | None = None
    max_stop_strings: int = 8
    max_stop_chars: int = 256
    max_n: int = 16
    max_tokens: int | None = None
    max_logprobs: int = 20

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{f.name}: expected a positive integer, got {v!r}")

    def prompt_chars(self, context: int) -> int:
        return self.max_prompt_chars if self.max_prompt_chars is not None else 32 * context


FLAGS = {  # field -> (flag, help)
    "max_body_bytes": ("--max-request-bytes", "largest request body in bytes (413 beyond)"),
    "max_json_depth": ("--max-json-depth", "deepest nesting of a JSON body"),
    "max_prompt_chars": ("--max-prompt-chars", "characters of text in one request's prompts "
                         "or messages, checked before tokenizing (default: 32 x the model's "
                         "context length)"),
    "max_stop_strings": ("--max-stop-strings", "stop strings per request (OpenAI allows 4)"),
    "max_stop_chars": ("--max-stop-chars", "characters per stop string"),
    "max_n": ("--max-n", "largest n (and best_of) per request"),
    "max_tokens": ("--max-tokens-limit", "largest max_tokens per request (default: the "
                   "model's context length)"),
    "max_logprobs": ("--max-logprobs", "largest logprobs / top_logprobs per request"),
}


def check_text_size(limits: Limits, context: int, texts, field: str) -> None:
    total = sum(len(t) for t in texts)
    most = limits.prompt_chars(context)
    if total > most:
        raise APIError(400, f"{field}: {total} characters of text; this server takes at most "
                            f"{most} per request (--max-prompt-chars)", field)


def check_request(limits: Limits, req, context: int) -> None:
    """The limits a completion or chat request must meet, before its text is tokenized."""
    stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stop) > limits.max_stop_strings:
        raise APIError(400, f"stop: {len(stop)} stop strings; this server takes at most "
                            f"{limits.max_stop_strings} (--max-stop-strings)", "stop")
    long = [s for s in stop if len(s) > limits.max_stop_chars]
    if long:
        raise APIError(400, f"stop: a stop string of {len(long[0])} characters; at most "
                            f"{limits.max_stop_chars} (--max-stop-chars)", "stop")
    for name in ("n", "best_of"):
        v = getattr(req, name, None)
        if v is not None and v > limits.max_n:
            raise APIError(400, f"{name} = {v}: this server allows at most {limits.max_n} "
                                "(--max-n)", name)
    for name in ("max_tokens", "max_completion_tokens"):
        v = getattr(req, name, None)
        if v is not None and limits.max_tokens is not None and v > limits.max_tokens:
            raise APIError(400, f"{name} = {v}: this server allows at most {limits.max_tokens} "
                                "(--max-tokens-limit)", name)
    for name in ("logprobs", "top_logprobs"):
        v = getattr(req, name, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > limits.max_logprobs:
            raise APIError(400, f"{name} = {v}: this server returns at most "
                                f"{limits.max_logprobs} (--max-logprobs)", name)
