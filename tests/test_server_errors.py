"""Bad input gets a 4xx with an OpenAI-style error body naming the problem (never a 500, never
a stuck engine); the adapter folder's path rules; the API key; a request that fails inside the
engine or the handler fails alone (500 with a body) and the server keeps serving."""

import os

import httpx
import openai
import pytest

from server_helpers import local_server, tiny_world

CHAT = [{"role": "user", "content": "hi"}]
# (endpoint, body or raw bytes, status, param, words the message must contain)
BAD = [
    ("completions", b'{"prompt": "x", ', 400, None, "not valid JSON"),
    ("completions", b"[1, 2]", 400, None, "valid dictionary"),
    ("completions", {"max_tokens": 3}, 400, "prompt", "Field required"),
    ("completions", {"prompt": 5}, 400, "prompt", "valid string"),
    ("completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ("completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens", "valid integer"),
    ("completions", {"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens", "valid integer"),
    ("completions", {"prompt": "x", "stream": "yes"}, 400, "stream", "valid boolean"),
    ("completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature", "finite"),
    ("completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature", "greater than"),
    ("completions", {"prompt": "x", "top_p": 0}, 400, "top_p", "greater than 0"),
    ("completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p", "less than"),
    ("completions", {"prompt": "x", "top_k": -2}, 400, "top_k", "greater than"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "greater than"),
    ("completions", {"prompt": "x", "seed": -1}, 400, "seed", "greater than"),
    ("completions", {"prompt": "x", "stop": [""]}, 400, "stop", "non-empty"),
    ("completions", {"prompt": "x", "model": "nope"}, 404, "model",
     "The model `nope` does not exist."),
    ("completions", {"prompt": "x", "max_tokens": 600}, 400, "max_tokens",
     "maximum context length is 512"),
    ("completions", {"prompt": "y" * 600}, 400, "prompt", "your prompt has 601 tokens"),
    ("completions", {"prompt": [1, 2, 500]}, 400, "prompt",
     "token ids must be integers in [0, 99)"),
    ("completions", {"prompt": [1, -3]}, 400, "prompt", "token ids"),
    ("completions", {"prompt": []}, 400, "prompt", "empty prompt"),
    ("completions", {"prompt": [1, True]}, 400, "prompt", ""),
    ("completions", {"prompt": "x", "suffix": "s"}, 400, "suffix", "not supported"),
    ("completions", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate", "unknown field"),
    ("completions", {"prompt": "x", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only allowed when stream is true"),
    ("completions", {"prompt": ["x"] * 2000}, 400, "prompt", "exceed the queue limit"),
    ("chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("chat/completions", {"messages": "hi"}, 400, "messages", "valid list"),
    ("chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages",
     "Input should be"),
    ("chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages",
     "chat template refused these messages: unsupported role: tool"),
    ("chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages",
     'messages[0].content[0]: only text content is supported (got type "image_url")'),
    ("chat/completions", {"messages": [{"role": "user", "content": None}]}, 400, "messages",
     "messages[0].content: expected a string or a list of text parts, got null"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages", "a text part is"),
    ("chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs",
     "needs logprobs: true"),
    ("chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400,
     "top_logprobs", "at most 20 (--max-logprobs)"),
    ("chat/completions", {"messages": CHAT, "best_of": 2}, 400, "best_of", "not supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": "z" * 17000}]}, 400,
     "messages", "--max-prompt-chars"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400,
     "messages", "messages[0].content: not valid Unicode (a lone surrogate \\ud800 at "
     "character 1)"),
    # limits and ranges of the OpenAI fields
    ("completions", {"prompt": "x", "n": 17}, 400, "n", "at most 16 (--max-n)"),
    ("completions", {"prompt": "x", "n": 0}, 400, "n", "greater than"),
    ("completions", {"prompt": "x", "n": 2, "best_of": 1}, 400, "best_of", "must be >= n"),
    ("completions", {"prompt": "x", "best_of": 3, "stream": True}, 400, "best_of",
     "cannot be streamed"),
    ("completions", {"prompt": "x", "logprobs": 21}, 400, "logprobs", "at most 20"),
    ("completions", {"prompt": "x", "logprobs": -1}, 400, "logprobs", "greater than"),
    ("completions", {"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty",
     "less than"),
    ("completions", {"prompt": "x", "frequency_penalty": -2.5}, 400, "frequency_penalty",
     "greater than"),
    ("completions", {"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty",
     "greater than"),
    ("completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias",
     "[-100, 100]"),
    ("completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "token ids"),
    ("completions", {"prompt": "x", "logit_bias": {"500": 1}}, 400, "logit_bias", "[0, 99)"),
    ("completions", {"prompt": "x", "stop_token_ids": [99]}, 400, "stop_token_ids", "[0, 99)"),
    ("completions", {"prompt": "x", "min_tokens": 20, "max_tokens": 5}, 400, "min_tokens",
     "max_tokens"),
    ("completions", {"prompt": "x", "stop": ["a"] * 9}, 400, "stop", "at most 8"),
    ("completions", {"prompt": "x", "stop": ["a" * 300]}, 400, "stop", "at most 256"),
    ("completions", {"prompt": "x", "temperature": 1e6}, 400, "temperature", "less than or equal"),
    ("completions", {"prompt": "x", "seed": 2**63}, 400, "seed", "less than or equal"),
    ("completions", {"prompt": "y" * 17000}, 400, "prompt", "16384 per request"),
    ("completions", {"prompt": ["y" * 9000, "y" * 9000]}, 400, "prompt", "18000 characters"),
    ("completions", {"prompt": "x", "n": 9, "best_of": 16, "max_tokens": 2}, 200, None, ""),
    # the body itself
    ("completions", b'{"prompt": "\\ud800"}', 400, "prompt", "not valid Unicode"),
    ("completions", b'{"prompt": "x", "model": "\\udfff"}', 400, "model", "model: not valid"),
    ("completions", b'{"prompt": "x", "\\ud800": 1}', 400, None, "a key is not valid Unicode"),
    ("completions", b'{"prompt": "x", "stop": ["\\ud83d"]}', 400, "stop", "stop[0]: not valid"),
    ("completions", b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", 400, "prompt",
     "nested deeper than 32"),
    ("completions", b"[" * 100000 + b"]" * 100000, 400, None, "nested too deeply"),
    ("completions", b'{"prompt": "' + b"x" * (9 * 2**20) + b'"}', 413, None,
     "--max-request-bytes"),
    ("completions", b'{"prompt": "\xff"}', 400, None, ""),
    ("completions", {"prompt": 'x', "messages": 5}, 400, "messages", "unknown field"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x",
                                        "tool_calls": [{"id": "1"}]}]}, 400, "messages",
     "messages[0].tool_calls is not supported"),
    ("chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools",
     "not supported"),
    ("chat/completions", {"messages": CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format", "not supported"),
    ("chat/completions", {"messages": CHAT, "max_completion_tokens": 5000}, 400, "max_tokens",
     "maximum context length"),
    ("chat/completions", {"messages": CHAT, "model": "a99"}, 404, "model", "does not exist"),
]


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return tiny_world(request.config, tmp_path_factory)


def _post(url, path, body, **kw):
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, timeout=30,
                          headers={"content-type": "application/json", **kw.pop("headers", {})})
    return httpx.post(url + path, json=body, timeout=30, **kw)


def _check_error(r, status, param=None, words=""):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] == param, err
    assert words in err["message"], err
    return err


@pytest.mark.parametrize("endpoint,body,status,param,words", BAD)
def test_bad_requests_get_a_4xx_with_an_openai_error(world, endpoint, body, status, param, words):
    r = _post(world.main.url, f"/v1/{endpoint}", body)
    if status == 200:  # limits at their edge are fine
        assert r.status_code == 200, r.text
        return
    err = _check_error(r, status, param, words)
    assert err["type"] == {400: "BadRequestError", 404: "NotFoundError",
                           413: "RequestTooLargeError"}[status]


def test_the_engine_is_fine_after_all_the_bad_requests(world):
    m = world.main.metrics()
    assert m["uora_rt:num_requests_running"] == 0 and m["uora_rt:kv_blocks_used"] == 0
    r = _post(world.main.url, "/v1/completions", {"prompt": "x", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_unknown_routes_and_methods_use_the_error_shape(world):
    _check_error(httpx.get(world.main.url + "/v1/nothing"), 404, None, "Not Found")
    _check_error(httpx.get(world.main.url + "/v1/completions"), 405, None, "Method Not Allowed")


def test_adapter_path_rules(world, tmp_path):
    url, folder = world.main.url, world.dir
    outside = world.adapters["a0"]                       # a valid adapter outside the folder
    (folder / "escape.uora").unlink(missing_ok=True)
    os.symlink(outside, folder / "escape.uora")
    (folder / "truncated.uora").write_bytes(world.loadable["x0"].read_bytes()[:100])
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "not-an-adapter").mkdir(exist_ok=True)
    (folder / "other-base.uora").unlink(missing_ok=True)
    from models_tiny import tiny_llama
    from peft_ref import make_adapter

    make_adapter(lambda: tiny_llama(vocab_size=99, hidden_size=32, intermediate_size=48),
                 folder / "other-base.uora", r=8)
    load = lambda name, path: _post(url, "/v1/load_lora_adapter",  # noqa: E731
                                    {"lora_name": name, "lora_path": path})
    _check_error(load("e1", "../adapters/a0.uora"), 400, "lora_path", "'..' is not allowed")
    _check_error(load("e1", "sub/../x0.uora"), 400, "lora_path", "'..' is not allowed")
    _check_error(load("e1", str(outside)), 400, "lora_path", "outside the adapter folder")
    _check_error(load("e1", "/etc/hostname"), 400, "lora_path", "outside the adapter folder")
    _check_error(load("e1", "escape.uora"), 400, "lora_path", "resolves outside")
    _check_error(load("e1", "missing.uora"), 404, "lora_path", "No adapter found")
    err = _check_error(load("e1", "truncated.uora"), 400, "lora_path", "cannot load adapter")
    assert "truncated.uora" in err["message"] and "expected" in err["message"]
    _check_error(load("e1", "other-base.uora"), 400, "lora_path", "base.modules")
    _check_error(load("e1", "sub/not-an-adapter"), 400, "lora_path", "PEFT VeRA adapter")
    _check_error(load("a0", "x0.uora"), 400, "lora_name", "has already been loaded")
    _check_error(load("base", "x0.uora"), 400, "lora_name", "served base model's name")
    _check_error(load("", "x0.uora"), 400, "lora_name", "Both 'lora_name' and 'lora_path'")
    _check_error(load("e1", ""), 400, "lora_path", "Both 'lora_name' and 'lora_path'")
    _check_error(load("has space", "x0.uora"), 400, "lora_name", "without spaces")
    _check_error(_post(url, "/v1/load_lora_adapter", {"lora_name": "e1"}), 400, "lora_path",
                 "Field required")
    _check_error(_post(url, "/v1/unload_lora_adapter", {"lora_name": "never"}), 404,
                 "lora_name", "The lora adapter 'never' cannot be found.")
    names = [c["id"] for c in httpx.get(url + "/v1/models").json()["data"]]
    assert "e1" not in names and len(names) == 1 + len(world.adapters)


def test_api_key_guards_every_v1_route(world):
    url = world.guarded.url
    for path in ("/v1/models", "/v1/completions", "/v1/nothing"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            r = httpx.post(url + path, json={"prompt": "x"}, headers=headers)
            _check_error(r, 401, None, "Unauthorized")
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    client = openai.OpenAI(base_url=url + "/v1", api_key="sesame", max_retries=0)
    assert client.completions.create(model="a0", prompt="x", max_tokens=2).usage.total_tokens
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


@pytest.fixture(scope="module")
def local(world):
    """The app in this process (loading off), so a test can break the engine on purpose."""
    with local_server(world) as served:
        yield served


def test_loading_is_off_unless_allowed(local):
    url, _ = local
    for path, body in (("/v1/load_lora_adapter", {"lora_name": "n", "lora_path": "p"}),
                       ("/v1/unload_lora_adapter", {"lora_name": "a0"})):
        _check_error(_post(url, path, body), 404, None, "--allow-adapter-loading")


def test_an_engine_failure_fails_that_request_only(local, monkeypatch):
    url, state = local
    model = state.engine.rt.model
    forward = model.forward
    calls = {"n": 0}

    def flaky(*args, **kwargs):  # the model's forward, failing on its first call
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    body = {"model": "a0", "prompt": "x", "max_tokens": 4}
    err = _check_error(_post(url, "/v1/completions", body), 500, None, "injected fault")
    assert err["type"] == "InternalServerError"
    ok = _post(url, "/v1/completions", body)
    assert ok.status_code == 200
    calls["n"] = 0
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30,
                      json={"messages": CHAT, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200
        events = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert "injected fault" in events[-2] and '"InternalServerError"' in events[-2]
    assert events[-1] == "data: [DONE]"
    assert _post(url, "/v1/completions", body).status_code == 200
    assert state.engine.engine.blocks_used == 0


def test_a_handler_exception_is_a_500_with_a_body(local, monkeypatch):
    url, _ = local
    from uora_rt.server import completions

    def broken(*a, **k):
        raise ZeroDivisionError("handler bug")

    monkeypatch.setattr(completions, "stop_reason", broken)
    err = _check_error(_post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}), 500,
                       None, "ZeroDivisionError: handler bug")
    assert err["type"] == "InternalServerError"
    monkeypatch.undo()
    assert _post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2}).status_code == 200
    assert httpx.get(url + "/health").status_code == 200


@pytest.mark.parametrize("argv,words", [
    (["--allow-adapter-loading"], "--allow-adapter-loading needs --adapter-dir"),
    (["--adapter-dir", "."], "--adapter-dir only matters with --allow-adapter-loading"),
    (["--adapter", "=x.uora"], "expected NAME=PATH"),
    (["--adapter", "a=x.uora", "--adapter", "a=y.uora"], "names given twice: ['a']"),
    (["--adapter", "base=ADAPTER"], "served base model's name"),
    (["--adapter", "bad=MISSING"], "--adapter bad=nowhere.uora: "),
    (["--adapter", "a=ADAPTER", "--max-queued-requests", "0"],
     "--max-queued-requests: expected >= 1"),
    (["--random-weights"], "--random-weights needs BASE"),
])
def test_serve_refuses_bad_arguments_before_listening(world, capfd, argv, words):
    from uora_rt import cli

    argv = [a.replace("ADAPTER", str(world.adapters["a0"])).replace("MISSING", "nowhere.uora")
            for a in argv]
    base = [] if argv == ["--random-weights"] else [str(world.base)]
    assert cli.main(["serve", *base, *argv, "--port", "1"]) == 2
    err = capfd.readouterr().err  # (capfd: a check the engine core makes prints there)
    assert err.startswith("uora-rt serve: ") and words in err, err
