"""`uora-rt serve` as processes: the engine core dies mid-stream (an error event, no hang, 503s,
exit code 1), a front end of several dies (the others keep serving), SIGTERM drains and leaves no
process behind."""

import json
import os
import signal
import time

import httpx
import psutil
import pytest

from server_helpers import Server, poll, tiny_base

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX processes")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("proc") / "base")


def _core(server) -> psutil.Process:
    kids = psutil.Process(server.proc.pid).children(recursive=True)
    cores = [p for p in kids if "uora_rt.commands.engine_core" in " ".join(p.cmdline())]
    assert len(cores) == 1
    return cores[0]


def _stream(url, max_tokens=400):
    return httpx.stream("POST", url + "/v1/completions", timeout=30,
                        json={"prompt": "hello", "max_tokens": max_tokens, "stream": True,
                              "ignore_eos": True})


def test_a_dead_core_ends_streams_fails_health_and_exits_1(base, tmp_path):
    server = Server([base], tmp_path / "s.log")
    try:
        core = _core(server)
        events = []
        with _stream(server.url) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line)
                    if len(events) == 3:
                        core.kill()
                        killed = time.monotonic()
        assert events[-1] == "data: [DONE]"
        err = json.loads(events[-2].removeprefix("data: "))
        assert "engine core stopped" in err["error"]["message"]
        assert time.monotonic() - killed < 5  # no hang
        health = poll(lambda: _status(server.url + "/health") == 503 or
                      server.proc.poll() is not None, timeout=5)
        assert health
        assert server.proc.wait(30) == 1
    finally:
        server.stop()


def _status(url):
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return None


def test_front_ends_share_one_core_and_survive_each_other(base, tmp_path):
    server = Server([base, "--api-server-count", "2"], tmp_path / "s.log")
    try:
        core = _core(server)
        workers = [p for p in psutil.Process(server.proc.pid).children()
                   if "spawn_main" in " ".join(p.cmdline())]  # uvicorn's worker processes
        assert len(workers) == 2
        body = {"prompt": "hi", "max_tokens": 4, "temperature": 0}
        want = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
        workers[0].kill()
        for _ in range(6):  # whichever front end takes the connection answers the same
            got = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
            assert got.status_code == 200
            assert got.json()["choices"][0]["text"] == want["choices"][0]["text"]
        assert core.is_running()
    finally:
        server.stop()


def test_sigterm_drains_and_leaves_no_process(base, tmp_path):
    server = Server([base], tmp_path / "s.log")
    core = _core(server)
    with _stream(server.url, max_tokens=24) as r:
        lines = iter(r.iter_lines())
        first = next(x for x in lines if x.startswith("data: "))
        server.proc.send_signal(signal.SIGTERM)
        rest = [x for x in lines if x.startswith("data: ")]
    assert first and rest[-1] == "data: [DONE]"  # the request in flight finished
    chunks = [json.loads(x.removeprefix("data: ")) for x in [first] + rest[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert server.proc.wait(30) == 0
    assert poll(lambda: not core.is_running() or core.status() == psutil.STATUS_ZOMBIE, 10)
    server.stop()
