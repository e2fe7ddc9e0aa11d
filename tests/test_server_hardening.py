"""One bad request never changes the server: text that is not valid Unicode is a 400 naming the
field wherever it appears (and a failed load registers nothing); metrics labels exist only for
served models; an unexpected exception is a JSON 500 for that request alone, logged with its
request id, on a connection that stays open."""

import json
import logging
import socket

import httpx
import pytest
from server_helpers import local_server, parse_metrics, tiny_world


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    return tiny_world(request.config, tmp_path_factory)


def raw_post(url, path, raw: bytes):
    return httpx.post(url + path, content=raw, headers={"content-type": "application/json"},
                      timeout=30)


def snapshot(url):
    models = httpx.get(url + "/v1/models")
    metrics = httpx.get(url + "/metrics")
    assert models.status_code == 200 and metrics.status_code == 200
    labels = sorted({line.split("{", 1)[1].split("}")[0] for line in metrics.text.splitlines()
                     if line.startswith("uora_rt:requests_total{")})
    return [c["id"] for c in models.json()["data"]], labels


def test_lone_surrogates_anywhere_are_400s_that_change_nothing(world):
    url = world.main.url
    before = snapshot(url)
    cases = [
        ("/v1/load_lora_adapter", b'{"lora_name": "x\\ud800", "lora_path": "x0.uora"}',
         "lora_name"),
        ("/v1/load_lora_adapter", b'{"lora_name": "ok", "lora_path": "x0\\udc00.uora"}',
         "lora_path"),
        ("/v1/unload_lora_adapter", b'{"lora_name": "a0\\ud800"}', "lora_name"),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
        ("/v1/completions", b'{"prompt": ["ok", "\\udfff"]}', "prompt"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "name": "\\ud800", '
                                 b'"content": "x"}]}', "messages"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": [{"type": "text",'
                                 b' "text": "\\ud800"}]}]}', "messages"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "prompt"),
    ]
    for path, raw, param in cases:
        r = raw_post(url, path, raw)
        assert r.status_code == 400, (path, r.text)
        err = r.json()["error"]
        assert err["param"] == param and "not valid Unicode" in err["message"], err
    assert snapshot(url) == before
    r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 200


def test_metrics_labels_only_for_served_models(world):
    url = world.main.url
    for name in ("nope-1", "nope-2", "nope-3"):
        assert httpx.post(url + "/v1/completions",
                          json={"model": name, "prompt": "x"}).status_code == 404
    m = parse_metrics(httpx.get(url + "/metrics").text)
    assert m['uora_rt:requests_rejected_total{reason="unknown_model"}'] >= 3
    assert not [k for k in m if "nope" in k]


@pytest.fixture(scope="module")
def local(world):
    with local_server(world) as served:
        yield served


def _http(sock, path, body: dict, rid: str) -> tuple[int, dict, dict]:
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"X-Request-Id: {rid}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
    while len(rest) < int(headers["content-length"]):
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, json.loads(rest)


def test_an_unexpected_exception_is_a_json_500_on_a_connection_that_stays_open(
        local, monkeypatch, caplog):
    url, _ = local
    from uora_rt.server import completions

    def broken(*a, **k):
        raise ZeroDivisionError("handler bug")

    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        monkeypatch.setattr(completions, "stop_reason", broken)
        with caplog.at_level(logging.ERROR, logger="uora_rt.server"):
            status, headers, body = _http(sock, "/v1/completions",
                                          {"prompt": "x", "max_tokens": 2}, "trace-42")
        assert status == 500 and headers["x-request-id"] == "trace-42"
        assert body["error"]["type"] == "InternalServerError"
        assert "ZeroDivisionError" in body["error"]["message"]
        assert "trace-42" in body["error"]["message"]
        assert any("trace-42" in r.getMessage() and r.exc_info for r in caplog.records)
        monkeypatch.undo()
        status, headers, body = _http(sock, "/v1/completions",  # the same connection
                                      {"prompt": "x", "max_tokens": 2}, "trace-43")
        assert status == 200 and body["usage"]["completion_tokens"] >= 1
    assert httpx.get(url + "/health").status_code == 200


def test_a_failed_load_registers_nothing(local, world, monkeypatch, tmp_path):
    url, state = local
    state.config.allow_adapter_loading = True
    from uora_rt.server.adapters import AdapterDir

    state.adapter_dir = AdapterDir(world.dir)
    real = state.engine.rt.add_adapter

    def add_then_fail(*a, **k):  # registered, then something breaks before the answer
        real(*a, **k)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(state.engine.rt, "add_adapter", add_then_fail)
    try:
        r = httpx.post(url + "/v1/load_lora_adapter",
                       json={"lora_name": "half", "lora_path": "x0.uora"}, timeout=30)
        assert r.status_code == 500 and "disk on fire" in r.json()["error"]["message"]
        assert "half" not in state.engine.rt.manager
        assert [c["id"] for c in httpx.get(url + "/v1/models").json()["data"]] == ["base", "a0"]
    finally:
        state.config.allow_adapter_loading = False
