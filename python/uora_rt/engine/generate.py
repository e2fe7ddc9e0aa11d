"""`rt.generate`: a batch of prompts, one adapter (or none) each, run to completion on an engine
sized for the call (its KV cache holds exactly what the prompts and max_new_tokens need)."""

from __future__ import annotations

from dataclasses import dataclass

from uora_rt.engine import Engine, SamplingParams


@dataclass
class Generation:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    adapter: str | None
    prompt_tokens: int


def generate(rt, prompts, adapters=None, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
             stop=None, seed=0, chat=None) -> list[Generation]:
    """prompts: strings (through the chat template when the tokenizer has one, unless chat=False)
    or lists of token ids; adapters: a name or None per prompt; stop: strings that end a sequence
    (not included in its text); seed: sampling seed (sequence i uses seed + i, so its output does
    not depend on the rest of the batch)."""
    if rt.model.kind != "decoder":
        raise ValueError("generate needs a decoder model; this base is an encoder")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    names = list(adapters) if adapters is not None else [None] * len(prompts)
    if len(names) != len(prompts):
        raise ValueError(f"adapters: expected {len(prompts)} entries, got {len(names)}")
    if not prompts:
        return []
    encoded = [_encode(rt, p, chat) for p in prompts]
    block = 16
    need = sum(-(-(len(e) + max_new_tokens) // block) * block for e in encoded)
    engine = Engine(rt, kv_cache_tokens=need, max_num_seqs=len(prompts), block_size=block)
    rids = []
    try:
        for i, (e, n) in enumerate(zip(encoded, names)):
            rids.append(engine.add_request(e, n, SamplingParams(
                max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                seed=seed + i, stop=stop)))
    except Exception:  # one bad prompt: nothing of this call stays in flight
        for r in rids:
            engine.abort(r)
        engine.run_until_done()
        raise
    done = engine.run_until_done()
    return [Generation(o.text, o.token_ids, o.finish_reason, n, o.prompt_tokens)
            for o, n in ((done[r], n) for r, n in zip(rids, names))]


def _encode(rt, prompt, chat) -> list[int]:
    if isinstance(prompt, str):
        if rt.codec is None:
            raise ValueError("text prompts need a tokenizer; this base has no tokenizer.json")
        return rt.codec.encode_prompt(prompt, chat)
    return [int(t) for t in prompt]
