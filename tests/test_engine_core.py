"""The engine core in its own process, driven through CoreClient over its socket: the same tokens
as the in-process engine (greedy and seeded sampling, stop strings, max_tokens, adapters), aborts,
refusals with the in-process errors, adapter loading, and a core that dies mid-stream."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import uora_rt
from server_helpers import tiny_adapters, tiny_base
from uora_rt import Engine, SamplingParams
from uora_rt.engine.client import CoreClient, CoreGone


def _opts(tmp, base, adapters, **kw):
    return {"base": str(base), "device": "cpu", "dtype": "float32", "slots": 8,
            "tensor_parallel": 1, "random_weights": False,
            "adapters": [[n, str(p)] for n, p in adapters.items()], "kv_cache_tokens": 4096,
            "max_num_seqs": None, "max_step_tokens": 64, "enable_prefix_caching": True,
            "log_level": "warning",
            "address": f"ipc://{tmp}/core.sock", "parent": os.getpid(), **kw}


class Core:
    def __init__(self, tmp, base, adapters, **kw):
        self.opts = _opts(tmp, base, adapters, **kw)
        cfg = tmp / "core.json"
        cfg.write_text(json.dumps(self.opts))
        self.log = open(tmp / "core.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "uora_rt.commands.engine_core",
                                      str(cfg)], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def client(self, **kw) -> CoreClient:
        return CoreClient(self.opts["address"], self.proc.pid, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
        self.log.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("core")
    base = tiny_base(tmp / "base")
    ads = tiny_adapters(tmp / "adapters", 3)
    core = Core(tmp, base, ads)
    yield tmp, base, ads, core
    core.stop()


async def _collect(stream):
    outs = [o async for o in stream]
    return outs


def _local(base, ads, prompts, names, params):
    rt = uora_rt.load(base, adapters=list(ads.items()))
    engine = Engine(rt, kv_cache_tokens=4096, max_step_tokens=64)
    rids = [engine.add_request(p, n, pr) for p, n, pr in zip(prompts, names, params)]
    done = engine.run_until_done()
    return [done[r] for r in rids]


def test_outputs_equal_the_in_process_engine(world):
    _, base, ads, core = world
    prompts = [[1, 40, 41, 42], [1, 50] * 20, [1, 60, 61], [1, 70, 71, 72, 73]]
    names = ["a0", None, "a1", "a2"]
    params = [SamplingParams(max_tokens=12, ignore_eos=True),
              SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=7),
              SamplingParams(max_tokens=20, stop=["e"], temperature=1.0, seed=3),
              SamplingParams(max_tokens=6)]
    want = _local(base, ads, prompts, names, params)

    async def run():
        client = await core.client().connect()
        try:
            streams = [await client.submit(p, n, pr, f"r{i}")
                       for i, (p, n, pr) in enumerate(zip(prompts, names, params))]
            return await asyncio.gather(*[_collect(s) for s in streams])
        finally:
            client.close()

    got = asyncio.run(run())
    for outs, w in zip(got, want):
        last = outs[-1]
        assert last.finished and all(not o.finished for o in outs[:-1])
        assert (last.token_ids, last.text, last.finish_reason, last.stop_reason) == \
            (w.token_ids, w.text, w.finish_reason, w.stop_reason)
        assert "".join(o.new_text for o in outs) == w.text
        assert [t for o in outs for t in o.new_token_ids] == w.token_ids


def test_refusals_aborts_and_adapters(world):
    tmp, base, ads, core = world
    extra = tiny_adapters(tmp / "more", 1, prefix="z")

    async def run():
        client = await core.client().connect()
        try:
            with pytest.raises(KeyError, match="unknown adapter 'nope'"):
                await client.submit([1, 2], "nope", SamplingParams(), "bad")
            with pytest.raises(ValueError, match="already in use"):
                s = await client.submit([1, 2], None, SamplingParams(max_tokens=200), "dup")
                await client.submit([1, 2], None, SamplingParams(), "dup")
            assert client.abort("dup")
            outs = await _collect(s)
            assert outs[-1].finish_reason == "abort"
            await client.adapter_op("load", "z0", str(extra["z0"]))
            assert "z0" in client.adapter_names()
            out = (await _collect(await client.submit([1, 5], "z0",
                                                      SamplingParams(max_tokens=3), "z")))[-1]
            assert out.finished and out.adapter == "z0"
            await client.adapter_op("unload", "z0")
            with pytest.raises(KeyError):
                await client.submit([1, 5], "z0", SamplingParams(), "z2")
            from uora_rt.engine.client import AdapterError

            with pytest.raises(AdapterError) as e:
                await client.adapter_op("unload", "z0")
            assert e.value.status == 404
        finally:
            client.close()

    asyncio.run(run())


def test_a_core_that_dies_ends_every_stream(tmp_path):
    base = tiny_base(tmp_path / "base")
    core = Core(tmp_path, base, {})
    dead = []

    async def run():
        client = await core.client(on_dead=lambda: dead.append(time.monotonic())).connect()
        stream = await client.submit([1, 2, 3], None,
                                     SamplingParams(max_tokens=400, ignore_eos=True), "long")
        outs = []
        async for out in stream:
            outs.append(out)
            if len(outs) == 2:
                killed = time.monotonic()
                os.kill(core.proc.pid, signal.SIGKILL)
        assert outs[-1].finished and outs[-1].error == "the engine core stopped"
        assert dead and dead[0] - killed < 1.0 and not client.healthy
        with pytest.raises(CoreGone):
            await client.submit([1], None, SamplingParams(), "after")
        client.close()

    try:
        asyncio.run(run())
    finally:
        core.stop()
