"""Batched generation with a KV cache: left-padded prompts, one adapter (or none) per sequence,
sequences finishing at different times (finished rows leave the batch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Generation:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    adapter: str | None
    prompt_tokens: int


def sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
           gens: list[torch.Generator]) -> torch.Tensor:
    """logits [B, V] float32 -> next token ids [B]. temperature 0 = greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1).cpu()
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0]
                        for i, g in enumerate(gens)]).to(logits.device)


def _encode(rt, prompts, chat):
    out = []
    for p in prompts:
        if isinstance(p, str):
            if rt.codec is None:
                raise ValueError("text prompts need a tokenizer; this base has no tokenizer.json")
            out.append(rt.codec.encode_prompt(p, chat))
        else:
            out.append([int(t) for t in p])
        if not out[-1]:
            raise ValueError("empty prompt")
    return out


@torch.no_grad()
def generate(rt, prompts, adapters=None, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
             stop=None, seed=0, chat=None, static=None) -> list[Generation]:
    """prompts: strings (through the chat template when the tokenizer has one, unless chat=False)
    or lists of token ids; adapters: a name or None per prompt; stop: strings that end a sequence
    (not included in its text); seed: sampling seed (sequence i uses seed + i, so its output does
    not depend on the rest of the batch). static: decode through fixed-shape steps (CUDA graphs on
    the GPU; default on CUDA) instead of a shrinking batch."""
    model = rt.model
    if model.kind != "decoder":
        raise ValueError("generate needs a decoder model; this base is an encoder")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    names = list(adapters) if adapters is not None else [None] * len(prompts)
    if len(names) != len(prompts):
        raise ValueError(f"adapters: expected {len(prompts)} entries, got {len(names)}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    static = rt.device.type == "cuda" if static is None else static
    encoded = _encode(rt, prompts, chat)
    b, longest = len(encoded), max(len(e) for e in encoded)
    capacity = longest + max_new_tokens
    if capacity > model.spec.max_positions:
        raise ValueError(f"prompt + max_new_tokens = {capacity} exceeds the model's "
                         f"{model.spec.max_positions} positions")
    dev = rt.device
    pad = rt.codec.pad_id if rt.codec else 0
    ids = torch.full((b, longest), pad, dtype=torch.long)
    valid = torch.zeros(b, capacity, dtype=torch.bool)
    for i, e in enumerate(encoded):  # left padding: every row's last prompt token is aligned
        ids[i, longest - len(e):] = torch.tensor(e)
        valid[i, longest - len(e):] = True
    ids, valid = ids.to(dev), valid.to(dev)
    eos = _eos_ids(rt)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(b)]
    hook = rt._hook(names, valid[:, :longest])
    results: list[Generation | None] = [None] * b
    try:
        if static:  # prefill straight into the decoder's (bucket-sized) cache
            dec = rt.decoders.get(rt, b, capacity, hook, graph=dev.type == "cuda")
            cache = dec.cache
            cache.length = 0
        else:
            cache = model.new_cache(b, capacity)
        positions = (valid[:, :longest].long().cumsum(1) - 1).clamp(min=0)
        logits = model(ids, positions, valid, cache, hook, last_only=True)[:, -1].float()
        if static:
            dec.start(valid[:, :longest], positions[:, -1], hook)
        alive = list(range(b))  # original index of each running sequence
        row = list(range(b))    # its row in `logits`
        outs = [[] for _ in range(b)]
        pos = positions[:, -1]
        for step in range(max_new_tokens):
            nxt = sample(logits[row], temperature, top_p, top_k, [gens[i] for i in alive]).tolist()
            keep = []
            for i, tok in zip(alive, nxt):
                done = _advance(rt, i, tok, outs, eos, stop, step == max_new_tokens - 1)
                if done:
                    text, reason = done
                    results[i] = Generation(text, outs[i], reason, names[i], len(encoded[i]))
                else:
                    keep.append(i)
            if not keep:
                break
            fed = {i: t for i, t in zip(alive, nxt)}
            if static:  # every row keeps its place; finished rows are fed padding
                feed = torch.full((b,), pad, dtype=torch.long)
                feed[keep] = torch.tensor([fed[i] for i in keep])
                logits = dec.step(feed.to(dev)).float()
                row = keep
            else:  # finished sequences leave the batch
                rows = torch.tensor([alive.index(i) for i in keep], device=dev)
                if len(keep) < len(alive):
                    cache.keep_rows(rows)
                    valid, pos = valid.index_select(0, rows), pos.index_select(0, rows)
                    if hook is not None:
                        hook.set_step(torch.ones(len(keep), 1, dtype=torch.bool, device=dev), rows)
                elif hook is not None and step == 0:
                    hook.set_step(torch.ones(len(keep), 1, dtype=torch.bool, device=dev))
                pos = pos + 1
                tokens = torch.tensor([[fed[i]] for i in keep], device=dev)
                logits = model(tokens, pos[:, None], valid, cache, hook, last_only=True)[:, -1]
                logits = logits.float()
                row = list(range(len(keep)))
            alive = keep
    finally:
        if hook is not None:
            hook.close()
    return results


def _eos_ids(rt) -> set[int]:
    v = rt.config.get("eos_token_id")
    eos = set(v if isinstance(v, list) else [v] if v is not None else [])
    if rt.codec and rt.codec.eos_id is not None:
        eos.add(rt.codec.eos_id)
    return eos


def _advance(rt, i, tok, outs, eos, stop, last):
    """Appends one token to sequence i; returns (text, finish reason) when it is finished."""
    if tok in eos:
        return (rt.codec.decode(outs[i]) if rt.codec else ""), "stop"
    outs[i].append(tok)
    text = rt.codec.decode(outs[i]) if rt.codec else ""
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    if cut >= 0:
        return text[:cut], "stop"
    return (text, "length") if last else None
