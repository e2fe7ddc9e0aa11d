"""A request's parameters, its state inside the engine, and what the engine reports about it."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1 = off; seed None = the engine draws one (the
    request is still reproducible from its RequestOutput.seed); stop: strings that end the
    output (not included in its text); ignore_eos: keep going past end-of-sequence tokens (for
    benchmarks with fixed output lengths)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens", ">= 1"),
            (_finite(self.temperature) and self.temperature >= 0, "temperature", ">= 0"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k", ">= 0 (0 = off)"),
            (self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
             "seed", "None or an integer in [0, 2**63)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}: expected {want}, got "
                                 f"{getattr(self, name)!r}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class RequestOutput:
    """One request's state after a step. token_ids/text: everything generated so far (without
    the end-of-sequence token that ended it; text cut before a stop string); new_token_ids /
    new_text: what this step added (for streaming)."""

    request_id: str
    adapter: str | None
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None  # "stop", "length" or "abort" once finished
    prompt_tokens: int
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    seed: int | None = None
    error: str | None = None   # set when the request failed inside the engine (finish "abort")
    stop_reason: str | int | None = None  # the stop string, or the end-of-sequence token id,
                                          # that ended it ("stop"); None otherwise
    cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """A request inside the engine. `tokens` holds the prompt then every generated token;
    `computed` of them have their keys/values in the KV cache (reset by preemption)."""

    def __init__(self, request_id: str, prompt_ids: list[int], adapter: str | None, lease,
                 params: SamplingParams, seed: int, detok, eos: set[int], on_output=None):
        self.request_id, self.adapter, self.lease = request_id, adapter, lease
        self.params, self.seed = params, seed
        self.tokens = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.computed = 0
        self.blocks: list[int] = []
        # prefix caching (engine/scheduler.py): the identity the KV is keyed by, the keys of the
        # full blocks so far, how many of `blocks` are findable, prompt tokens found cached
        # when it first entered (None until then)
        self.cache_root: bytes | None = None
        self.keys: list[bytes] = []
        self.cached_blocks = 0
        self.cached_tokens: int | None = None
        self.status = Status.WAITING
        self.pinned = False
        self.detok, self.eos, self.on_output = detok, eos, on_output
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.preemptions = 0

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def max_total(self) -> int:
        return self.prompt_len + self.params.max_tokens
