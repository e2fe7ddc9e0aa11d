"""Server-Sent Events for both endpoints: one chunk per output step of each choice (choice index
= prompt index * n + sequence index), [DONE] at the end; an engine failure or a bug after the
200 went out is an error event in the stream."""

from __future__ import annotations

import json
import logging

from starlette.responses import StreamingResponse

from uora_rt.server import protocol as P
from uora_rt.server.errors import error_body
from uora_rt.server.logprobs import chat_logprobs, completion_logprobs

log = logging.getLogger("uora_rt.server")


def sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage_so_far(job) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    done = sum(t.tokens for t in job.trackers)
    cached = sum(t.cached_tokens for t in job.trackers[::job.k])  # a prompt's first sequence
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _stream(job, req, chunk_choice, object_name, first_chunks=()):
    """The SSE body shared by both endpoints: chunk_choice(prompt index, out) -> a choice or
    None."""
    opts = req.stream_options or P.StreamOptions()
    head = {"id": job.id, "object": object_name, "created": job.created, "model": job.model}
    try:
        for choice in first_chunks:
            yield _event({**head, "choices": [choice]})
        async for i, out in job.outputs():
            if out.finished and (out.error or out.finish_reason == "abort"):
                yield _event(error_body(500, job.failure()))
                break
            choice = chunk_choice(i, out)
            if choice is None:
                continue
            chunk = {**head, "choices": [choice]}
            if opts.continuous_usage_stats:
                chunk["usage"] = _usage_so_far(job)
            yield _event(chunk)
        else:
            if opts.include_usage:
                yield _event({**head, "choices": [], "usage": job.usage()})
        yield "data: [DONE]\n\n"
    except Exception as e:  # a bug of ours after the 200 went out: say so in the stream
        log.exception("stream %s failed", job.id)
        yield _event(error_body(500, f"internal error: {type(e).__name__}: {e}"))
        yield "data: [DONE]\n\n"
    finally:  # the client went away (cancelled), or we are done: abort what still runs
        job.close()


def stream_completion(job, req, echo: list[str]):
    from uora_rt.server.completions import stop_reason

    st, params, k = job.state, job.params, req.logprobs
    offsets: dict[int, int] = {}  # choice -> characters sent so far (text_offset)

    def choice(i, out):
        if not out.new_token_ids and not out.finished:
            return None
        index = i * job.n + out.index
        first = index not in offsets
        text = (echo[i] if first else "") + out.new_text
        lp = None
        if k is not None:
            entries = list(out.new_logprobs or [])
            ids = [e.token_id for e in entries]
            if first and req.echo:
                ids = list(job.prompts[i]) + ids
                entries = list(out.prompt_logprobs or [None] * len(job.prompts[i])) + entries
            lp = completion_logprobs(st.token_texts, ids, entries, k, offsets.get(index, 0))
        offsets[index] = offsets.get(index, 0) + len(text)
        c = {"index": index, "text": text, "logprobs": lp,
             "finish_reason": out.finish_reason if out.finished else None,
             "stop_reason": stop_reason(st, out, params) if out.finished else None}
        if req.return_token_ids:
            c["token_ids"] = out.new_token_ids
        return c

    return _stream(job, req, choice, "text_completion")


def stream_chat(job, req):
    from uora_rt.server.completions import stop_reason

    st, params = job.state, job.params
    k = (req.top_logprobs or 0) if req.logprobs else None
    first = [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None} for j in range(job.n)]

    def choice(i, out):
        if not out.new_token_ids and not out.finished:
            return None
        delta = {"content": out.new_text} if out.new_text or not out.finished else {}
        if req.return_token_ids:
            delta["token_ids"] = out.new_token_ids
        lp = chat_logprobs(st.token_texts, out.new_logprobs or [], k) if k is not None else None
        return {"index": out.index, "delta": delta, "logprobs": lp,
                "finish_reason": out.finish_reason if out.finished else None,
                "stop_reason": stop_reason(st, out, params) if out.finished else None}

    return _stream(job, req, choice, "chat.completion.chunk", first)
