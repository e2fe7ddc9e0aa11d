"""/v1/completions and /v1/chat/completions: a request becomes engine requests (one per prompt),
their outputs become one JSON response or a Server-Sent Events stream.

Order of checks (each a 4xx before anything reaches the engine): fields the server does not
implement, the model name, the prompt (tokenized off the event loop), the sampling parameters
and the context length, then admission (503 when the queue is full) and submission, with no
await between the last two. A client that goes away (mid-stream, or while a non-streamed
request runs) aborts its engine requests, which frees their KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from uora_rt.engine import ContextLengthError, SamplingParams
from uora_rt.server import protocol as P
from uora_rt.server.errors import APIError, error_body

log = logging.getLogger("uora_rt.server")


class Job:
    """The engine requests of one HTTP request: streams, trackers, final outputs."""

    def __init__(self, state, adapter, prompts, params, prefix):
        self.state, self.adapter, self.prompts, self.params = state, adapter, prompts, params
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = state.model_name(adapter)
        self.streams, self.trackers = [], []
        self.finals: list = [None] * len(prompts)

    def submit(self) -> None:
        st, aio = self.state, asyncio.get_running_loop()
        st.admit(len(self.prompts))
        try:
            for i, ids in enumerate(self.prompts):
                tracker = st.metrics.tracker(self.model)
                self.trackers.append(tracker)
                self.streams.append(st.loop.submit(ids, self.adapter, self.params,
                                                   f"{self.id}-{i}", asyncio_loop=aio))
        except KeyError:  # unloaded between the name check and now
            self.close()
            raise APIError(404, f"The model `{self.model}` does not exist.", "model") from None
        except ValueError as e:
            self.close()
            raise APIError(400, str(e)) from None

    async def outputs(self):
        """(index, RequestOutput) as they come, over all prompts."""
        if len(self.streams) == 1:
            async for out in self.streams[0]:
                yield 0, self._seen(0, out)
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, stream):
            async for out in stream:
                q.put_nowait((i, out))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self.streams)]
        try:
            left = len(tasks)
            while left:
                i, out = await q.get()
                left -= out.finished
                yield i, self._seen(i, out)
        finally:
            for t in tasks:
                t.cancel()

    def _seen(self, i, out):
        tracker = self.trackers[i]
        tracker.output(out)
        if out.finished:
            self.finals[i] = out
            reason = "error" if out.error or out.finish_reason == "abort" else out.finish_reason
            tracker.finish(reason, out.prompt_tokens)
        return out

    def close(self) -> None:
        """Aborts whatever has not finished (the client is gone, or a sibling failed)."""
        for i, (stream, tracker) in enumerate(zip(self.streams, self.trackers)):
            if self.finals[i] is None:
                self.state.loop.abort(stream.request_id)
                tracker.finish("abort")
        for tracker in self.trackers[len(self.streams):]:
            tracker.finish("abort")

    def failure(self) -> str | None:
        bad = [o for o in self.finals if o is not None and (o.error or o.finish_reason == "abort")]
        if not bad:
            return None
        return f"the engine failed this request: {bad[0].error or 'aborted'}"

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        done = sum(completion_tokens(o, self.params) for o in self.finals if o is not None)
        cached = sum(o.cached_tokens for o in self.finals if o is not None)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": cached}}


def completion_tokens(out, params) -> int:
    """Tokens the model produced, counting the end-of-sequence token that ended the output (the
    engine reports its id as stop_reason, not among token_ids), as vLLM and OpenAI do."""
    return len(out.token_ids) + int(isinstance(out.stop_reason, int))


def stop_reason(state, out, params) -> str | None:
    """The stop string that ended the text (None for EOS or length, as vLLM reports)."""
    return out.stop_reason if isinstance(out.stop_reason, str) else None


# --- building the engine requests -----------------------------------------------------------
def _check_supported(req) -> None:
    bad = P.unsupported_field(req)
    if bad is not None:
        name, value = bad
        raise APIError(400, f"{name} = {json.dumps(value)} is not supported by this server",
                       name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       "stream_options")


def _completion_prompts(state, req: P.CompletionRequest) -> list[list[int]]:
    p = req.prompt
    batch = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
    engine, out = state.engine, []
    try:
        for item in batch:
            if isinstance(item, str):
                item = engine.encode(item, add_special_tokens=req.add_special_tokens is not False)
            out.append(engine.check_prompt(item))
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None
    return out


def _chat_prompt(state, req: P.ChatCompletionRequest) -> list[int]:
    if not state.engine.has_chat_template:
        raise APIError(400, "this base has no chat template: use /v1/completions", "messages")
    messages = []
    for i, m in enumerate(req.messages):
        extra = {k: v for k, v in (m.model_extra or {}).items() if v not in (None, [], {}, "")}
        if extra:
            raise APIError(400, f"messages[{i}].{next(iter(extra))} is not supported by this "
                                "server", "messages")
        content = m.content if isinstance(m.content, str) else \
            "\n".join(part.text for part in m.content or [])
        msg = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        messages.append(msg)
    try:
        return state.engine.encode_chat(messages, req.add_generation_prompt is not False)
    except (ValueError, TemplateError, TypeError) as e:
        why = str(e).removeprefix("chat template: ")
        raise APIError(400, f"the chat template refused these messages: {why}", "messages") \
            from None


def _params(state, req, prompts, requested, default, what) -> SamplingParams:
    engine, longest = state.engine, max(len(p) for p in prompts)
    room = engine.max_request_tokens - longest
    max_tokens = requested if requested is not None else default(max(room, 1))
    try:
        engine.check_length(longest, max_tokens, what)
    except ContextLengthError as e:
        raise APIError(400, str(e), e.field) from None
    d = state.defaults
    top_k = req.top_k if req.top_k is not None else d["top_k"]
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else d["temperature"],
            top_p=req.top_p if req.top_p is not None else d["top_p"],
            top_k=0 if top_k == -1 else top_k, seed=req.seed, stop=req.stop,
            ignore_eos=bool(req.ignore_eos))
    except ValueError as e:  # "SamplingParams.<field>: expected ..., got ..."
        msg = str(e)
        field = msg.split(":", 1)[0].removeprefix("SamplingParams.")
        raise APIError(400, msg.removeprefix("SamplingParams."), field) from None


async def _until_done_or_gone(request: Request, job: Job):
    """Collects every final output; a client disconnect first aborts the job instead."""

    async def collect():
        async for _ in job.outputs():
            pass

    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled itself (the server noticed the client go)
        work.cancel()
        watch.cancel()
        job.close()
        raise
    watch.cancel()
    if work not in done:  # the client left first
        work.cancel()
        job.close()
        return False
    if work.exception() is not None:
        job.close()
    work.result()  # re-raises a failure of the handler's own code
    return True


# --- the two endpoints ----------------------------------------------------------------------
async def create_completion(state, req: P.CompletionRequest, request: Request) -> Response:
    _check_supported(req)
    adapter = state.adapter_for(req.model)
    prompts = await asyncio.to_thread(_completion_prompts, state, req)
    params = _params(state, req, prompts, req.max_tokens, lambda room: min(16, room), "prompt")
    job = Job(state, adapter, prompts, params, "cmpl")
    job.submit()
    if req.stream:
        return _sse(_stream_completion(job, req))
    if not await _until_done_or_gone(request, job):
        return Response(status_code=204)
    if job.failure():
        raise APIError(500, job.failure())
    choices = [P.CompletionChoice(
        index=i, text=o.text, finish_reason=o.finish_reason,
        stop_reason=stop_reason(state, o, params),
        token_ids=o.token_ids if req.return_token_ids else None,
        prompt_token_ids=job.prompts[i] if req.return_token_ids else None)
        for i, o in enumerate(job.finals)]
    return _json(P.CompletionResponse(id=job.id, created=job.created, model=job.model,
                                      choices=choices, usage=job.usage()))


async def create_chat_completion(state, req: P.ChatCompletionRequest, request: Request):
    _check_supported(req)
    adapter = state.adapter_for(req.model)
    prompt = await asyncio.to_thread(_chat_prompt, state, req)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    params = _params(state, req, [prompt], requested, lambda room: room, "messages")
    job = Job(state, adapter, [prompt], params, "chatcmpl")
    job.submit()
    if req.stream:
        return _sse(_stream_chat(job, req))
    if not await _until_done_or_gone(request, job):
        return Response(status_code=204)
    if job.failure():
        raise APIError(500, job.failure())
    o = job.finals[0]
    choice = P.ChatChoice(index=0, message=P.AssistantMessage(content=o.text),
                          finish_reason=o.finish_reason, stop_reason=stop_reason(state, o, params),
                          token_ids=o.token_ids if req.return_token_ids else None)
    return _json(P.ChatCompletionResponse(
        id=job.id, created=job.created, model=job.model, choices=[choice], usage=job.usage(),
        prompt_token_ids=prompt if req.return_token_ids else None))


def _json(model) -> Response:
    return Response(model.model_dump_json(exclude_none=False), media_type="application/json")


# --- streaming ------------------------------------------------------------------------------
def _sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _event(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _usage_so_far(job) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    done = sum(t.tokens for t in job.trackers)
    cached = sum(t.cached_tokens for t in job.trackers)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def _stream(job, req, chunk_choice, object_name, first_chunks=()):
    """The SSE body shared by both endpoints: chunk_choice(index, out) -> a choice or None."""
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


def _stream_completion(job, req):
    st, params = job.state, job.params

    def choice(i, out):
        if not out.new_token_ids and not out.finished:
            return None
        c = {"index": i, "text": out.new_text, "logprobs": None,
             "finish_reason": out.finish_reason if out.finished else None,
             "stop_reason": stop_reason(st, out, params) if out.finished else None}
        if req.return_token_ids:
            c["token_ids"] = out.new_token_ids
        return c

    return _stream(job, req, choice, "text_completion")


def _stream_chat(job, req):
    st, params = job.state, job.params
    first = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
              "finish_reason": None}]

    def choice(i, out):
        if not out.new_token_ids and not out.finished:
            return None
        delta = {"content": out.new_text} if out.new_text or not out.finished else {}
        if req.return_token_ids:
            delta["token_ids"] = out.new_token_ids
        return {"index": i, "delta": delta, "logprobs": None,
                "finish_reason": out.finish_reason if out.finished else None,
                "stop_reason": stop_reason(st, out, params) if out.finished else None}

    return _stream(job, req, choice, "chat.completion.chunk", first)
