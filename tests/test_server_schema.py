"""The fuzz test: schemathesis against the server's own OpenAPI schema (every route, valid and
invalid requests, a bounded number of examples per operation), each generated body sent again
with a lone surrogate in every string (JSON may say "\\ud800"; Unicode may not), and a list of
hand-written hostile bodies for every POST route. No answer may be a 5xx; afterwards /health,
/v1/models and /metrics answer 200, nothing is left running, and a fixed greedy request gives
the same text as before. The counts are printed at the end."""

import json

import httpx
import pytest
schemathesis = pytest.importorskip("schemathesis")  # a test extra; absent on some GPU images
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server_helpers import parse_metrics, poll, tiny_world

AUTH = {"Authorization": "Bearer sesame"}
COUNTS = {"generated": 0, "generated with surrogates": 0, "hostile": 0, "failures": 0}
FAILED: list = []
FIXED = {"model": "a0", "prompt": "The fixed request", "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return tiny_world(request.config, tmp_path_factory)


@pytest.fixture(scope="module")
def api_schema(world):
    schema = schemathesis.openapi.from_url(world.guarded.url + "/openapi.json")
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


def _fixed_text(url):
    r = httpx.post(url + "/v1/completions", json=FIXED, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def before(world):
    return _fixed_text(world.guarded.url)


def test_fixed_request_before_the_fuzzing(before):
    assert before


def _poison(body):
    """The body with "\\ud800" appended to every string (keys included)."""
    if isinstance(body, str):
        return body + "\ud800"
    if isinstance(body, list):
        return [_poison(x) for x in body]
    if isinstance(body, dict):
        return {_poison(k): _poison(v) for k, v in body.items()}
    return body


def _has_text(body) -> bool:
    return "\ud800" in json.dumps(_poison(body), ensure_ascii=False) if body is not None \
        else False


def _record(what, status, detail):
    COUNTS[what] += 1
    if status >= 500:
        COUNTS["failures"] += 1
        FAILED.append((what, status, detail[:300]))


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(case, world):
    try:
        response = case.call(headers=AUTH, timeout=60)
    except Exception as e:  # a dropped connection counts as a failure too
        _record("generated", 599, f"{case.method} {case.formatted_path}: {e}")
        raise
    _record("generated", response.status_code, f"{case.method} {case.formatted_path}: "
                                               f"{response.text}")
    case.validate_response(response, checks=[not_a_server_error])
    body = getattr(case, "body", None)
    if case.method.upper() == "POST" and isinstance(body, (dict, list)) and _has_text(body):
        raw = json.dumps(_poison(body)).encode()  # ensure_ascii: "\ud800" as an escape
        r = httpx.post(world.guarded.url + case.formatted_path, content=raw, timeout=60,
                       headers={**AUTH, "content-type": "application/json"})
        _record("generated with surrogates", r.status_code, f"{case.formatted_path} {raw[:200]}"
                                                            f" -> {r.text}")
        assert r.status_code < 500, r.text


POST_ROUTES = ["/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
               "/v1/unload_lora_adapter", "/tokenize", "/detokenize"]
HOSTILE = [
    b"", b"null", b"[]", b"{}", b'"text"', b"0", b"-", b"\xef\xbb\xbf{}", b"\xff\xfe{}",
    b"\xc0\xaf", b'{"prompt": "\xed\xa0\x80"}', b'{"prompt": "\\u0000"}', b"[" * 5000,
    b"{" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000, b'{"prompt": NaN}', b'{"prompt": Infinity}',
    b'{"max_tokens": 1e999}', b'{"max_tokens": 1' + b"0" * 5000 + b"}",
    b'{"prompt": "x", "prompt": 5}', b'{"prompt": "x", "seed": 18446744073709551616}',
    b'{"prompt": "x", "n": 1000000000}', b'{"prompt": "x", "max_tokens": 1000000000000000000}',
    b'{"prompt": "x", "top_k": 1099511627776}', b'{"prompt": "x", "temperature": 1e-45}',
    b'{"prompt": "x", "top_p": 5e-324}', b'{"prompt": "x", "logprobs": true}',
    b'{"prompt": [1, 2, 1e30]}', b'{"prompt": [[]]}', b'{"prompt": [["a"]]}',
    b'{"prompt": [' + b"7," * 20000 + b"7]}", b'{"prompt": [-1]}',
    b'{"prompt": "x", "stop_token_ids": [1180591620717411303424]}',
    b'{"prompt": "x", "logit_bias": {"-1": 1}}', b'{"prompt": "x", "logit_bias": {"1e3": 1}}',
    b'{"prompt": "x", "logit_bias": {' + b",".join(b'"%d": 1' % i for i in range(5000)) + b"}}",
    b'{"prompt": "x", "stop": "\\u0000"}', b'{"prompt": "x", "model": "../../etc/passwd"}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
    b'{"url": "file:///etc/passwd"}}]}]}',
    b'{"messages": [{"role": "user", "content": null}]}',
    b'{"messages": [{"role": "user", "content": [null]}]}',
    b'{"messages": [{"role": "user", "content": "{{ 7 * 7 }}{% for x in range(99999999) %}'
    b'{% endfor %}"}]}',
    b'{"messages": [' + b'{"role": "user", "content": "hi"},' * 2000 + b'{"role": "user", '
    b'"content": "hi"}]}',
    b'{"lora_name": "' + b"n" * 10000 + b'", "lora_path": "x"}',
    b'{"lora_name": "n", "lora_path": "\\u0000"}', b'{"lora_name": "n", "lora_path": "/dev/zero"}',
    b'{"lora_name": "n", "lora_path": "' + b"a/" * 3000 + b'"}',
    b'{"lora_name": "\\u202e", "lora_path": "x"}',
    b'{"tokens": [1180591620717411303424]}', b'{"tokens": [-5]}', b'{"tokens": "abc"}',
    b'{"prompt": "' + b"\\ud83d\\ude00" * 1000 + b'"}',
]


def test_no_hostile_body_gets_a_server_error(world):
    url = world.guarded.url
    with httpx.Client(headers=AUTH, timeout=60) as http:
        for route in POST_ROUTES:
            for raw in HOSTILE:
                try:
                    r = http.post(url + route, content=raw,
                                  headers={"content-type": "application/json"})
                    _record("hostile", r.status_code, f"{route} {raw[:120]!r} -> {r.text}")
                except httpx.HTTPError as e:
                    _record("hostile", 599, f"{route} {raw[:120]!r}: {type(e).__name__} {e}")
    assert not [f for f in FAILED if f[0] == "hostile"], FAILED


def test_the_server_is_unchanged_after_the_fuzzing(world, before, capsys):
    url = world.guarded.url

    def idle():
        m = parse_metrics(httpx.get(url + "/metrics").text)
        return m["uora_rt:num_requests_running"] == 0 and m["uora_rt:kv_blocks_used"] == 0
    assert poll(idle, timeout=60)
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    models = httpx.get(url + "/v1/models", headers=AUTH)
    assert models.status_code == 200
    assert [c["id"] for c in models.json()["data"]] == ["base", "a0"]  # nothing was loaded
    assert _fixed_text(url) == before
    with capsys.disabled():
        print("\nfuzz: " + ", ".join(f"{v} {k}" for k, v in COUNTS.items()))
    assert COUNTS["generated"] > 0 and COUNTS["hostile"] == len(POST_ROUTES) * len(HOSTILE)
    assert COUNTS["failures"] == 0, FAILED
