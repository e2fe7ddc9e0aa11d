"""A request's parameters, its state inside the engine, and what the engine reports about it.

Everything a request carries is plain data (numbers, strings, lists, dicts of those), so that it
can cross a process boundary as it is."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

# OpenAI's ranges, which vLLM enforces too.
PENALTY_RANGE = (-2.0, 2.0)
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1 = off; seed None = the engine draws one (the
    request is still reproducible from its RequestOutput.seed); stop: strings that end the
    output (not included in its text); ignore_eos: keep going past end-of-sequence tokens (for
    benchmarks with fixed output lengths).

    n: sequences drawn from the one prompt (sequence i uses seed + i, mod 2**63); best_of: run
    that many (>= n) and let the caller keep the n with the highest mean logprob (each output
    carries cumulative_logprob). stop_token_ids: token ids that end a sequence like EOS does
    (also with ignore_eos). min_tokens: EOS and stop_token_ids cannot be drawn before that many
    tokens. presence/frequency_penalty (OpenAI's, on output tokens), repetition_penalty
    (transformers' and vLLM's, on prompt and output tokens; 1 = off), logit_bias {token id:
    bias} added to the logits. logprobs: k >= 0 -> each output token's logprob, rank and the
    k most likely tokens, from the model's raw logits (before penalties, temperature and
    top-k/top-p); prompt_logprobs: the same for every prompt token after the first."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or [])]
        self.stop_token_ids = list(self.stop_token_ids or [])
        bias = self.logit_bias or {}
        if isinstance(bias, dict):  # JSON keys arrive as strings: "50256" -> 50256
            bias = {_int_key(k): v for k, v in bias.items()}
        self.logit_bias = bias
        lo, hi = PENALTY_RANGE
        checks = [
            (_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", ">= 1"),
            (_finite(self.temperature) and self.temperature >= 0, "temperature", ">= 0"),
            (_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]"),
            (_is_int(self.top_k) and self.top_k >= 0, "top_k", ">= 0 (0 = off)"),
            (self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
             "seed", "None or an integer in [0, 2**63)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
            (_is_int(self.n) and self.n >= 1, "n", "an integer >= 1"),
            (self.best_of is None or (_is_int(self.best_of) and self.best_of >= self.n),
             "best_of", f"None or an integer >= n ({self.n})"),
            (all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
             "token ids (integers >= 0)"),
            (_is_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens,
             "min_tokens", f"an integer in [0, max_tokens ({self.max_tokens})]"),
            (_finite(self.presence_penalty) and lo <= self.presence_penalty <= hi,
             "presence_penalty", f"in [{lo:g}, {hi:g}]"),
            (_finite(self.frequency_penalty) and lo <= self.frequency_penalty <= hi,
             "frequency_penalty", f"in [{lo:g}, {hi:g}]"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty", "> 0 and finite (1 = off)"),
            (isinstance(bias, dict) and all(
                _is_int(k) and k >= 0 and _finite(v) and
                LOGIT_BIAS_RANGE[0] <= v <= LOGIT_BIAS_RANGE[1] for k, v in bias.items()),
             "logit_bias", "{token id >= 0: bias in [-100, 100]}"),
            (self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
             "logprobs", "None or an integer >= 0"),
            (self.prompt_logprobs is None or
             (_is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
             "prompt_logprobs", "None or an integer >= 0"),
        ]
        for ok, name, want in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}: expected {want}, got "
                                 f"{getattr(self, name)!r}")

    @property
    def sequences(self) -> int:
        """How many sequences the engine runs for this request: best_of, else n."""
        return max(self.n, self.best_of or self.n)

    @property
    def penalized(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1)

    @property
    def processed(self) -> bool:
        """The logits of this request are changed before sampling (penalties, bias, min_tokens)."""
        return self.penalized or bool(self.logit_bias) or self.min_tokens > 0


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_key(k):
    if isinstance(k, str) and k.strip().lstrip("-").isdigit():
        return int(k)
    return k


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class TokenLogprob:
    """One position's logprobs (log_softmax of the raw logits): the token there, its logprob
    and rank (1 = the most likely), and the `top` k most likely (token id, logprob), best
    first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


# RequestOutput's fields, in the order its constructor takes them.
OUTPUT_FIELDS = ("request_id", "adapter", "token_ids", "text", "finished", "finish_reason",
                 "prompt_tokens", "new_token_ids", "new_text", "seed", "error", "stop_reason",
                 "index", "logprobs", "new_logprobs", "prompt_logprobs", "cumulative_logprob",
                 "cached_tokens")


class _SharedList:
    """A RequestOutput field that may share a sequence's append-only list: share() records
    (list, lo, hi) and the first read copies list[lo:hi]; setting it stores the value itself."""

    def __set_name__(self, owner, name):
        self.value, self.src = f"_{name}", f"_{name}_src"

    def share(self, obj, src: list | None, lo: int, hi: int | None) -> None:
        if src is None:
            self.__set__(obj, None)
        else:
            setattr(obj, self.value, None)
            setattr(obj, self.src, (src, lo, hi))

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        src = getattr(obj, self.src)
        if src is not None:
            lst, lo, hi = src
            setattr(obj, self.value, lst[lo:hi])
            setattr(obj, self.src, None)
        return getattr(obj, self.value)

    def __set__(self, obj, value) -> None:
        setattr(obj, self.value, value)
        setattr(obj, self.src, None)


class RequestOutput:
    """One sequence's state after a step. token_ids/text: everything generated so far (without
    the end-of-sequence or stop token that ended it; text cut before a stop string); new_token_ids
    / new_text: what this step added (for streaming). index: which of the request's n (or
    best_of) sequences this is. logprobs: one entry per generated token (with the ending stop
    token's last, when one ended it), when SamplingParams.logprobs is set or best_of > n;
    prompt_logprobs: None for the first prompt token, then one per prompt token (once the
    prompt is computed). finish_reason: "stop", "length" or "abort" once finished; error: set
    when the request failed inside the engine (finish "abort"); stop_reason: the stop string,
    or the end-of-sequence / stop token id, that ended it ("stop"), else None; cached_tokens:
    prompt tokens read from the prefix cache instead of computed.

    The engine makes one output per sequence per step without copying what came before:
    token_ids, logprobs and prompt_logprobs share the sequence's own (append-only) lists and
    become lists of their own the first time they are read (O(length) then, once per output
    read; a streaming consumer that reads only new_token_ids / new_text / new_logprobs pays
    nothing per step for the length so far). Values are as of the step the output belongs to,
    whenever they are read."""

    __slots__ = ("request_id", "adapter", "text", "finished", "finish_reason", "prompt_tokens",
                 "new_token_ids", "new_text", "seed", "error", "stop_reason", "index",
                 "new_logprobs", "cumulative_logprob", "cached_tokens",
                 # _SharedList storage: the copy, or (shared list, lo, hi) until first read
                 "_token_ids", "_token_ids_src", "_logprobs", "_logprobs_src",
                 "_prompt_logprobs", "_prompt_logprobs_src")

    def __init__(self, request_id: str, adapter: str | None, token_ids: list[int], text: str,
                 finished: bool, finish_reason: str | None, prompt_tokens: int,
                 new_token_ids: list[int] | None = None, new_text: str = "",
                 seed: int | None = None, error: str | None = None,
                 stop_reason: str | int | None = None, index: int = 0,
                 logprobs: list[TokenLogprob] | None = None,
                 new_logprobs: list[TokenLogprob] | None = None,
                 prompt_logprobs: list[TokenLogprob | None] | None = None,
                 cumulative_logprob: float | None = None, cached_tokens: int = 0):
        self.request_id, self.adapter, self.text = request_id, adapter, text
        self.finished, self.finish_reason, self.prompt_tokens = finished, finish_reason, \
            prompt_tokens
        self.new_token_ids = new_token_ids if new_token_ids is not None else []
        self.new_text, self.seed, self.error = new_text, seed, error
        self.stop_reason, self.index = stop_reason, index
        self.new_logprobs, self.cumulative_logprob = new_logprobs, cumulative_logprob
        self.cached_tokens = cached_tokens
        self.token_ids, self.logprobs, self.prompt_logprobs = token_ids, logprobs, prompt_logprobs

    @classmethod
    def sharing(cls, request_id, adapter, tokens: list[int], lo: int, hi: int, text, finished,
                finish_reason, prompt_tokens, new_token_ids, new_text, seed, error, stop_reason,
                index, logprobs: list | None, new_logprobs, prompt_logprobs: list | None,
                cumulative_logprob, cached_tokens) -> RequestOutput:
        """An output whose token_ids are tokens[lo:hi], logprobs and prompt_logprobs those lists
        as long as they are now, each copied when first read: the lists may only grow after
        this call."""
        out = cls.__new__(cls)
        out.request_id, out.adapter, out.text = request_id, adapter, text
        out.finished, out.finish_reason, out.prompt_tokens = finished, finish_reason, \
            prompt_tokens
        out.new_token_ids, out.new_text, out.seed, out.error = new_token_ids, new_text, seed, error
        out.stop_reason, out.index = stop_reason, index
        out.new_logprobs, out.cumulative_logprob = new_logprobs, cumulative_logprob
        out.cached_tokens = cached_tokens
        RequestOutput.token_ids.share(out, tokens, lo, hi)
        RequestOutput.logprobs.share(out, logprobs, 0, None if logprobs is None else len(logprobs))
        RequestOutput.prompt_logprobs.share(
            out, prompt_logprobs, 0, None if prompt_logprobs is None else len(prompt_logprobs))
        return out

    token_ids = _SharedList()
    logprobs = _SharedList()
    prompt_logprobs = _SharedList()

    def _values(self) -> tuple:
        return tuple(getattr(self, f) for f in OUTPUT_FIELDS)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # mutable, compared by value (as the dataclass it replaces)

    def __repr__(self) -> str:
        return "RequestOutput(" + ", ".join(f"{f}={getattr(self, f)!r}"
                                            for f in OUTPUT_FIELDS) + ")"


def best_of(outputs: list[RequestOutput], n: int) -> list[RequestOutput]:
    """The n finished sequences with the highest mean logprob per token (OpenAI's best_of rule),
    in their original order."""
    def score(o):
        count = len(o.logprobs or ())
        return (o.cumulative_logprob or 0.0) / max(count, 1)
    keep = sorted(range(len(outputs)), key=lambda i: (-score(outputs[i]), i))[:n]
    return [outputs[i] for i in sorted(keep)]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """A sequence inside the engine. `tokens` holds the prompt then every generated token;
    `computed` of them have their keys/values in the KV cache (reset by preemption). A request
    with n > 1 runs as several Requests (index 0..n-1) under one request id."""

    def __init__(self, request_id: str, prompt_ids: list[int], adapter: str | None, lease,
                 params: SamplingParams, seed: int, detok, eos: set[int], on_output=None,
                 index: int = 0):
        self.request_id, self.adapter, self.lease = request_id, adapter, lease
        self.params, self.seed, self.index = params, seed, index
        self.tokens = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        self.max_total = self.prompt_len + params.max_tokens  # prompt + the most tokens drawn
        # Tokens drawn by a step still in flight (async scheduling), not yet in `tokens`: the
        # scheduler counts them (blocks, positions); their ids reach the next step on the device.
        self.pending = 0
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
        # Logits processing and logprobs (engine/processors.py).
        self.proc_slot: int | None = None      # row of the processor tables, if processed
        self.want_logprobs = params.logprobs is not None or params.sequences > params.n
        self.logprobs: list[TokenLogprob] = []
        self.cumulative_logprob = 0.0
        want_prompt = params.prompt_logprobs is not None
        self.prompt_logprobs: list[TokenLogprob | None] | None = [None] if want_prompt else None
        self.forks: list[Request] = []         # siblings waiting to copy this one's prompt KV
        # What every step reads of it, made once: its sampling row (temperature, top_k, top_p,
        # seed) and whether it asks for nothing beyond plain sampling (no logit processing,
        # logprobs or prompt logprobs), so a step of such requests skips those tables.
        self.sampling = (params.temperature, params.top_k, params.top_p, seed)
        self.plain = not (params.processed or self.want_logprobs or want_prompt)

    @property
    def num_tokens(self) -> int:
        """Tokens so far, the pending one (drawn, value not yet on the host) included."""
        return len(self.tokens) + self.pending

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def prompt_logprobs_done(self) -> int:
        """Prompt positions whose logprob entry exists (the first has None)."""
        return len(self.prompt_logprobs) if self.prompt_logprobs is not None else self.prompt_len
