"""/v1/completions and /v1/chat/completions: a request becomes engine requests (one per prompt,
each with n or best_of sequences), their outputs become one JSON response or a Server-Sent
Events stream (streaming.py).

Order of checks (each a 4xx before anything reaches the engine): fields the server does not
implement, the request limits (limits.py), the model name, the prompt's size in characters, the
prompt (tokenized off the event loop), the sampling parameters and the context length, then
admission (503 when the queue is full) and submission, with no await between the last two. A
client that goes away (mid-stream, or while a non-streamed request runs) aborts its engine
requests, which frees their KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from jinja2 import TemplateError
from starlette.requests import Request
from starlette.responses import Response

from uora_rt.engine import ContextLengthError, SamplingParams, best_of
from uora_rt.engine.client import CoreGone
from uora_rt.server import protocol as P
from uora_rt.server.errors import APIError
from uora_rt.server.limits import check_request, check_text_size
from uora_rt.server.logprobs import chat_logprobs, completion_logprobs
from uora_rt.server.streaming import sse, stream_chat, stream_completion

log = logging.getLogger("uora_rt.server")


class Job:
    """The engine requests of one HTTP request (one per prompt, params.sequences sequences
    each): streams, one metrics tracker per sequence, final outputs."""

    def __init__(self, state, adapter, prompts, params, prefix):
        self.state, self.adapter, self.prompts, self.params = state, adapter, prompts, params
        self.k, self.n = params.sequences, params.n
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = state.model_name(adapter)
        self.streams, self.trackers = [], []
        self.finals: list[list] = [[None] * self.k for _ in prompts]

    async def submit(self) -> None:
        st = self.state
        st.admit(len(self.prompts) * self.k)
        try:
            for i, ids in enumerate(self.prompts):
                self.trackers += [st.metrics.tracker(self.model) for _ in range(self.k)]
                self.streams.append(await st.engine.submit(ids, self.adapter, self.params,
                                                           f"{self.id}-{i}"))
        except KeyError:  # unloaded between the name check and now
            self.close()
            raise APIError(404, f"The model `{self.model}` does not exist.", "model") from None
        except ValueError as e:
            self.close()
            raise APIError(400, str(e)) from None
        except CoreGone as e:
            self.close()
            raise APIError(503, str(e)) from None
        except BaseException:  # cancelled (the client left): nothing may keep running
            self.close()
            raise

    async def outputs(self):
        """(prompt index, RequestOutput) as they come, over all prompts and sequences."""
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
            left = len(tasks) * self.k
            while left:
                i, out = await q.get()
                left -= out.finished
                yield i, self._seen(i, out)
        finally:
            for t in tasks:
                t.cancel()

    def _seen(self, i, out):
        tracker = self.trackers[i * self.k + out.index]
        tracker.output(out)
        if out.finished:
            self.finals[i][out.index] = out
            reason = "error" if out.error or out.finish_reason == "abort" else out.finish_reason
            tracker.finish(reason, out.prompt_tokens if out.index == 0 else 0)
        return out

    def close(self) -> None:
        """Aborts whatever has not finished (the client is gone, or a sibling failed)."""
        for stream, finals in zip(self.streams, self.finals):
            if any(f is None for f in finals):
                self.state.engine.abort(stream.request_id)
        for tracker in self.trackers:
            tracker.finish("abort")  # no-op for those already finished

    def failure(self) -> str | None:
        bad = [o for fs in self.finals for o in fs
               if o is not None and (o.error or o.finish_reason == "abort")]
        if not bad:
            return None
        return f"the engine failed this request: {bad[0].error or 'aborted'}"

    def kept(self, i: int) -> list:
        """Prompt i's choices: its n sequences, or the best n of best_of."""
        outs = self.finals[i]
        return best_of(outs, self.n) if self.k > self.n else outs

    def usage(self) -> dict:
        """Prompt tokens once per prompt; completion tokens of every sequence run (best_of's
        discarded ones too: they were computed)."""
        prompt = sum(len(p) for p in self.prompts)
        done = sum(completion_tokens(o) for fs in self.finals for o in fs if o is not None)
        # the n sequences of a prompt share its KV: its first sequence says what was cached
        cached = sum(fs[0].cached_tokens for fs in self.finals if fs[0] is not None)
        return {"prompt_tokens": prompt, "completion_tokens": done,
                "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": cached}}


def completion_tokens(out) -> int:
    """Tokens the model produced, counting the end-of-sequence (or stop) token that ended the
    output (the engine reports its id as stop_reason, not among token_ids), as vLLM does."""
    return len(out.token_ids) + int(isinstance(out.stop_reason, int))


def stop_reason(state, out, params) -> str | int | None:
    """The stop string or stop_token_ids entry that ended the text; None for EOS or length
    (vLLM's rule: EOS wins when a token is both)."""
    r = out.stop_reason
    if isinstance(r, int):
        eos = set() if params.ignore_eos else state.engine.eos
        return r if r in params.stop_token_ids and r not in eos else None
    return r


# --- building the engine requests -----------------------------------------------------------
def _check_supported(state, req) -> None:
    bad = P.unsupported_field(req)
    if bad is not None:
        name, value = bad
        raise APIError(400, f"{name} = {json.dumps(value)} is not supported by this server",
                       name)
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true",
                       "stream_options")
    check_request(state.config.limits, req, state.engine.max_model_len)


def _batch(req: P.CompletionRequest) -> list:
    p = req.prompt
    return p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]


def _completion_prompts(state, req: P.CompletionRequest, batch) -> list[list[int]]:
    engine, out = state.engine, []
    try:
        for item in batch:
            if isinstance(item, str):
                item = engine.encode(item, add_special_tokens=req.add_special_tokens is not False)
            out.append(engine.check_prompt(item))
    except ValueError as e:
        raise APIError(400, str(e), "prompt") from None
    return out


def chat_messages(state, messages) -> list[dict]:
    """Messages as the chat template takes them: content text only, checked, size-limited."""
    out = []
    for i, m in enumerate(messages):
        extra = {k: v for k, v in (m.model_extra or {}).items() if v not in (None, [], {}, "")}
        if extra:
            raise APIError(400, f"messages[{i}].{next(iter(extra))} is not supported by this "
                                "server", "messages")
        if m.content is None:
            raise APIError(400, f"messages[{i}].content: expected a string or a list of text "
                                "parts, got null", "messages")
        if isinstance(m.content, str):
            content = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                kind = part.get("type")
                if kind != "text":
                    raise APIError(400, f"messages[{i}].content[{j}]: only text content is "
                                        f"supported (got type {json.dumps(kind)})", "messages")
                if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                    raise APIError(400, f"messages[{i}].content[{j}]: a text part is "
                                        '{"type": "text", "text": "..."}', "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        msg = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    check_text_size(state.config.limits, state.engine.max_model_len,
                    [m["content"] for m in out], "messages")
    return out


def chat_prompt(state, messages: list[dict], add_generation_prompt) -> list[int]:
    if not state.engine.has_chat_template:
        raise APIError(400, "this base has no chat template: use /v1/completions", "messages")
    try:
        return state.engine.encode_chat(messages, add_generation_prompt is not False)
    except (ValueError, TemplateError, TypeError) as e:
        why = str(e).removeprefix("chat template: ")
        raise APIError(400, f"the chat template refused these messages: {why}", "messages") \
            from None


def _params(state, req, prompts, requested, default, what, **extra) -> SamplingParams:
    engine, longest = state.engine, max(len(p) for p in prompts)
    room = engine.max_request_tokens - longest
    max_tokens = requested if requested is not None else default(max(room, 1))
    try:
        engine.check_length(longest, max_tokens, what)
    except ContextLengthError as e:
        raise APIError(400, str(e), e.field) from None
    for name, ids in (("stop_token_ids", req.stop_token_ids or []),
                      ("logit_bias", list(req.logit_bias or {}))):
        bad = [t for t in ids if not (isinstance(t, int) or str(t).isdigit())
               or not 0 <= int(t) < engine.vocab]
        if bad:
            raise APIError(400, f"{name}: token ids must be integers in [0, {engine.vocab}), "
                                f"got {bad[:5]}", name)
    d = state.defaults
    pick = (lambda v, name: v if v is not None else d[name])
    top_k = pick(req.top_k, "top_k")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=pick(req.temperature, "temperature"),
            top_p=pick(req.top_p, "top_p"), top_k=0 if top_k == -1 else top_k, seed=req.seed,
            stop=req.stop, ignore_eos=bool(req.ignore_eos), n=req.n or 1,
            stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens or 0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=pick(req.repetition_penalty, "repetition_penalty"),
            logit_bias=dict(req.logit_bias or {}), **extra)
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
    _check_supported(state, req)
    n = req.n or 1
    if req.best_of is not None and req.best_of < n:
        raise APIError(400, f"best_of ({req.best_of}) must be >= n ({n})", "best_of")
    if req.stream and req.best_of is not None and req.best_of > n:
        raise APIError(400, "best_of > n cannot be streamed (the best are known at the end)",
                       "best_of")
    adapter = state.adapter_for(req.model)
    batch = _batch(req)
    check_text_size(state.config.limits, state.engine.max_model_len,
                    [p for p in batch if isinstance(p, str)], "prompt")
    prompts = await asyncio.to_thread(_completion_prompts, state, req, batch)
    k = req.logprobs
    params = _params(state, req, prompts, req.max_tokens, lambda room: min(16, room), "prompt",
                     best_of=req.best_of, logprobs=k,
                     prompt_logprobs=k if req.echo and k is not None else None)
    job = Job(state, adapter, prompts, params, "cmpl")
    await job.submit()
    echo = [(p if isinstance(p, str) else state.engine.codec.decode(ids)) if req.echo else ""
            for p, ids in zip(batch, job.prompts)]
    if req.stream:
        return sse(stream_completion(job, req, echo))
    if not await _until_done_or_gone(request, job):
        return Response(status_code=204)
    if job.failure():
        raise APIError(500, job.failure())
    choices = []
    for i, prompt in enumerate(job.prompts):
        for j, o in enumerate(job.kept(i)):
            lp = None
            if k is not None:
                ids, entries = [e.token_id for e in o.logprobs], list(o.logprobs)
                if req.echo:
                    ids, entries = list(prompt) + ids, list(o.prompt_logprobs) + entries
                lp = completion_logprobs(state.token_texts, ids, entries, k)
            choices.append(P.CompletionChoice(
                index=i * n + j, text=echo[i] + o.text, logprobs=lp,
                finish_reason=o.finish_reason, stop_reason=stop_reason(state, o, params),
                token_ids=o.token_ids if req.return_token_ids else None,
                prompt_token_ids=prompt if req.return_token_ids else None))
    return _json(P.CompletionResponse(id=job.id, created=job.created, model=job.model,
                                      choices=choices, usage=job.usage()))


async def create_chat_completion(state, req: P.ChatCompletionRequest, request: Request):
    _check_supported(state, req)
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
    adapter = state.adapter_for(req.model)
    messages = chat_messages(state, req.messages)
    prompt = await asyncio.to_thread(chat_prompt, state, messages, req.add_generation_prompt)
    requested = req.max_completion_tokens if req.max_completion_tokens is not None \
        else req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    params = _params(state, req, [prompt], requested, lambda room: room, "messages",
                     logprobs=k)
    job = Job(state, adapter, [prompt], params, "chatcmpl")
    await job.submit()
    if req.stream:
        return sse(stream_chat(job, req))
    if not await _until_done_or_gone(request, job):
        return Response(status_code=204)
    if job.failure():
        raise APIError(500, job.failure())
    choices = [P.ChatChoice(
        index=j, message=P.AssistantMessage(content=o.text),
        logprobs=chat_logprobs(state.token_texts, o.logprobs, k) if k is not None else None,
        finish_reason=o.finish_reason, stop_reason=stop_reason(state, o, params),
        token_ids=o.token_ids if req.return_token_ids else None)
        for j, o in enumerate(job.kept(0))]
    return _json(P.ChatCompletionResponse(
        id=job.id, created=job.created, model=job.model, choices=choices, usage=job.usage(),
        prompt_token_ids=prompt if req.return_token_ids else None))


def _json(model) -> Response:
    return Response(model.model_dump_json(exclude_none=False), media_type="application/json")
