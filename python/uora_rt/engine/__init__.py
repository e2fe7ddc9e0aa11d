"""The serving engine: continuous batching over a paged KV cache, sampling on the device.

    engine = uora_rt.Engine(rt)
    rid = engine.add_request("Hello", adapter="pirate", params=SamplingParams(max_tokens=32))
    while engine.has_unfinished():
        for out in engine.step(): ...

One job per file: request (parameters, state, outputs), scheduler (token budget, chunked prefill,
preemption), kv_cache (block pool and allocator), metadata (the step's device record), attention
(paged attention paths), runner (the forward), sampler, detokenizer, engine (the public loop),
loop (a background thread and per-request streams, for servers).
"""

from uora_rt.engine.engine import Engine
from uora_rt.engine.loop import EngineLoop, RequestStream
from uora_rt.engine.request import RequestOutput, SamplingParams, TokenLogprob, best_of
from uora_rt.engine.rules import ContextLengthError

__all__ = ["ContextLengthError", "Engine", "EngineLoop", "RequestOutput", "RequestStream",
           "SamplingParams", "TokenLogprob", "best_of"]
