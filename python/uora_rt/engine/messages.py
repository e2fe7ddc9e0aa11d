"""What the front ends and the engine core say to each other, as msgpack (msgspec): plain data,
no pickle, one schema here.

Front end -> core (over one DEALER socket per front end; the core's ROUTER knows each by its
identity): Hello, Submit, Abort, AdapterOp, Shutdown. Core -> front end: Ready (the limits and the
loaded adapters), Accepted / Reject (the answer to Submits: taken, or refused and why), Step
(every output of one step that belongs to this front end, as columns: one message per step, no
object per request), Reply (to an AdapterOp).
"""

from __future__ import annotations

import msgspec

# finish codes of Step.finish: 0 = still running
FINISH_REASONS = (None, "stop", "length", "abort")


class AdapterError(Exception):
    """An adapter operation refused: status 404 (no such adapter), 409 (the name is taken),
    400 (a bad file), 500 (a failure of ours)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Hello(msgspec.Struct, tag="hello"):
    pid: int


class Submit(msgspec.Struct, tag="submit"):
    request_id: str
    prompt: list[int]
    adapter: str | None
    params: dict  # SamplingParams' fields; seed always set (the front end draws a missing one)


class Abort(msgspec.Struct, tag="abort"):
    request_ids: list[str]
    index: list[int]  # the sequence of each to end, -1: all of them


class AdapterOp(msgspec.Struct, tag="adapter"):
    call_id: int
    op: str                 # "load" | "unload"
    name: str
    path: str | None = None  # load: a .uora file or PEFT VeRA folder, already checked


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class AdapterCard(msgspec.Struct, array_like=True):
    name: str
    source: str | None
    created: int


class Stats(msgspec.Struct, array_like=True):
    running: int
    waiting: int
    blocks_used: int
    blocks_total: int
    blocks_cached: int      # blocks holding a reusable prefix (held or free)
    # prefix cache, per adapter name ("" = the base): prompt tokens looked up, found cached
    prefix: list[tuple[str, int, int]]

    @classmethod
    def of(cls, engine) -> Stats:
        per = engine.prefix_cache_stats["per_adapter"]
        return cls(engine.num_running, engine.num_waiting, engine.blocks_used,
                   engine.allocator.capacity, engine.allocator.num_cached,
                   [("" if name is None else name, q, h) for name, (q, h) in per.items()])


class Ready(msgspec.Struct, tag="ready"):
    vocab: int
    max_model_len: int
    kv_capacity_tokens: int
    eos: list[int]
    adapters: list[AdapterCard]
    stats: Stats
    folder: str | None      # the base's folder (the front end loads its tokenizer from it)
    graphs: bool            # decode steps replay CUDA graphs


class Logprob(msgspec.Struct, array_like=True):
    """request.TokenLogprob on the wire."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


class Step(msgspec.Struct, tag="step"):
    """Rows of one step: sequence index[i] of request request_ids[i] produced tokens[i]
    (possibly none, when it only ended) and finished with FINISH_REASONS[finish[i]];
    stop_token[i] is the end-of-sequence or stop token id that ended it (-1 otherwise);
    cached[i] its prompt tokens read from the prefix cache. Sparse, by row: errors (requests
    that failed in the engine), logprobs (the new tokens' entries, for requests that asked),
    prompt_logprobs (once per sequence, when its prompt is computed)."""

    request_ids: list[str]
    index: list[int]
    tokens: list[list[int]]
    finish: list[int]
    stop_token: list[int]
    cached: list[int]
    errors: list[tuple[int, str]]
    logprobs: list[tuple[int, list[Logprob]]]
    prompt_logprobs: list[tuple[int, list[Logprob | None]]]
    stats: Stats

    @classmethod
    def empty(cls, stats: Stats) -> Step:
        return cls([], [], [], [], [], [], [], [], [], stats)


class Reply(msgspec.Struct, tag="reply"):
    call_id: int
    status: int             # 200, or the HTTP status the failure maps to
    error: str | None
    adapters: list[AdapterCard]


class Accepted(msgspec.Struct, tag="accepted"):
    """The Submits of one batch of messages that the core took (their requests are queued)."""

    request_ids: list[str]


class Reject(msgspec.Struct, tag="reject"):
    request_id: str
    status: int             # 400 (a bad request) or 404 (an adapter gone meanwhile)
    error: str


ToCore = Hello | Submit | Abort | AdapterOp | Shutdown
ToFrontEnd = Ready | Step | Reply | Accepted | Reject

ENCODER = msgspec.msgpack.Encoder()
TO_CORE = msgspec.msgpack.Decoder(ToCore)
TO_FRONT_END = msgspec.msgpack.Decoder(ToFrontEnd)
