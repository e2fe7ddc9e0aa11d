"""POST /tokenize and /detokenize, vLLM's routes and shapes: text (or chat messages through the
template) -> token ids, and back. `model` is checked like everywhere (the tokenizer is the
base's for every adapter)."""

from __future__ import annotations

import asyncio

from uora_rt.server import protocol as P
from uora_rt.server.completions import chat_messages, chat_prompt
from uora_rt.server.errors import APIError
from uora_rt.server.limits import check_text_size


def _codec(state):
    if state.engine.codec is None:
        raise APIError(400, "this base has no tokenizer (tokenizer.json)")
    return state.engine.codec


async def tokenize(state, req: P.TokenizeRequest) -> P.TokenizeResponse:
    state.adapter_for(req.model)
    _codec(state)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", "prompt")
    if req.prompt is not None:
        check_text_size(state.config.limits, state.engine.max_model_len, [req.prompt], "prompt")
        special = req.add_special_tokens is not False
        ids = await asyncio.to_thread(state.engine.encode, req.prompt, special)
    else:
        if req.add_special_tokens:
            raise APIError(400, "add_special_tokens with messages: the chat template writes "
                                "its own special tokens", "add_special_tokens")
        messages = chat_messages(state, req.messages)
        ids = await asyncio.to_thread(chat_prompt, state, messages, req.add_generation_prompt)
    strs = None
    if req.return_token_strs:
        tok = state.engine.codec.tok
        strs = [tok.id_to_token(t) or "" for t in ids]
    return P.TokenizeResponse(count=len(ids), max_model_len=state.engine.max_model_len,
                              tokens=ids, token_strs=strs)


async def detokenize(state, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
    state.adapter_for(req.model)
    codec = _codec(state)
    vocab = state.engine.vocab
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"tokens: token ids must be integers in [0, {vocab}), got "
                            f"{bad[:5]}", "tokens")
    if len(req.tokens) > state.config.limits.prompt_chars(state.engine.max_model_len):
        raise APIError(400, f"tokens: {len(req.tokens)} ids; at most "
                            f"{state.config.limits.prompt_chars(state.engine.max_model_len)} "
                            "(--max-prompt-chars)", "tokens")
    text = await asyncio.to_thread(codec.decode, list(req.tokens))
    return P.DetokenizeResponse(prompt=text)
