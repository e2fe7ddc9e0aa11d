"""Adapters inside the engine: lifetimes (remove while in use), device tiers (more adapters than
slots), threads (add/abort/add_adapter while a loop steps), bad input; the pool ends idle."""

import threading

import pytest

import uora_rt
from engine_helpers import BASES, assert_idle, build, load, random_prompts, reference_greedy
from peft_ref import make_adapter
from uora_rt import Engine, EngineLoop, SamplingParams
from uora_rt.core import format as fmt


def test_remove_adapter_while_in_use(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads, slots=1)
    engine = Engine(rt, kv_cache_tokens=1024)
    running = engine.add_request([7, 7, 7], "a0", SamplingParams(max_tokens=25))
    waiting = engine.add_request([8, 9], "a0", SamplingParams(max_tokens=5))
    engine.step()
    rt.remove_adapter("a0")
    assert "a0" not in rt.adapters
    with pytest.raises(KeyError, match="unknown adapter 'a0'"):
        engine.add_request([1], "a0")
    # A new adapter of the same family: its only slot is a0's, which must not be taken while
    # a0's requests hold it; the newcomer waits, then runs with its own vectors.
    other = make_adapter(BASES["llama"], tmp_path / "x.uora", lam_seed=77,
                         scale=1.0)
    rt.add_adapter(other, name="x")
    late = engine.add_request([8, 9], "x", SamplingParams(max_tokens=5))
    done = engine.run_until_done()
    assert done[running].token_ids == reference_greedy(fn, ads["a0"], [7, 7, 7], 25)
    assert done[waiting].token_ids == reference_greedy(fn, ads["a0"], [8, 9], 5)
    assert done[late].token_ids == reference_greedy(fn, other, [8, 9], 5)
    assert_idle(engine)
    assert rt.manager.entries["x"].slot >= 0  # x is resident now; a0's slot went back for it


def test_more_adapters_than_device_slots(tmp_path):
    fn, base, _ = build(tmp_path, n_adapters=0)
    paths = {f"t{i}": make_adapter(fn, tmp_path / f"t{i}.uora", lam_seed=100 + i, scale=1.0,
                                   reinit=i % 2 == 1) for i in range(8)}
    rt = load(base, paths, slots=2)
    fam = next(iter(rt.manager.families.values()))
    table_bytes = rt.manager.device_bytes()
    engine = Engine(rt, kv_cache_tokens=2048)
    prompts = random_prompts(8, seed=7)
    rids = [engine.add_request(p, n, SamplingParams(max_tokens=6))
            for p, n in zip(prompts, paths)]
    done = engine.run_until_done()
    for r, p, n in zip(rids, prompts, paths):
        assert done[r].token_ids == reference_greedy(fn, paths[n], p, 6), n
    assert rt.manager.stats["uploads"] >= 8 and rt.manager.stats["evictions"] >= 6
    assert fam.slots == 2 and fam.lambda_d.shape[0] == 2
    # registering many more leaves the device tables as they are (host memory grows instead)
    adapter = fmt.load(paths["t0"])
    for i in range(200):
        rt.add_adapter(adapter, name=f"many{i}")
    assert rt.manager.device_bytes() == table_bytes
    assert_idle(engine)


def test_family_releases_device_tensors(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    assert len(rt.manager.families) == 3
    engine = Engine(rt, kv_cache_tokens=512)
    r = engine.add_request([1, 2], "a2", SamplingParams(max_tokens=8))
    engine.step()
    rt.remove_adapter("a2")  # its family's only adapter, still in use
    assert len(rt.manager.families) == 3
    engine.run_until_done()
    assert len(rt.manager.families) == 2 and r not in engine._live
    for name in ("a0", "a1"):
        rt.remove_adapter(name)
    assert rt.manager.families == {} and rt.manager.device_bytes() == 0
    assert_idle(engine)


def test_threads_add_abort_and_adapters_while_the_loop_steps(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=4096, max_step_tokens=32)
    prompts = random_prompts(24, seed=8)
    names = [["a0", "a1", "a2", None][i % 4] for i in range(24)]
    solo = {}
    for i, (p, n) in enumerate(zip(prompts, names)):  # each request alone, first
        rid = engine.add_request(p, n, SamplingParams(max_tokens=8))
        solo[i] = engine.run_until_done()[rid].token_ids
    loop = EngineLoop(engine).start()
    results, errors = {}, []
    extra = make_adapter(BASES["llama"], tmp_path / "e.uora", lam_seed=9)

    def client(idx):
        try:
            for i in idx:
                outs = list(loop.submit(prompts[i], names[i], SamplingParams(max_tokens=8)))
                assert all(not o.finished for o in outs[:-1]) and outs[-1].finished
                assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
                results[i] = outs[-1].token_ids
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    def churn():
        for k in range(10):
            rt.add_adapter(extra, name=f"extra{k}")
            if k % 2:
                rt.remove_adapter(f"extra{k - 1}")

    victim = loop.submit([1, 2, 3], "a1", SamplingParams(max_tokens=200))
    threads = [threading.Thread(target=client, args=(range(k, 24, 3),)) for k in range(3)]
    threads.append(threading.Thread(target=churn))
    for t in threads:
        t.start()
    loop.abort(victim.request_id)
    for t in threads:
        t.join(120)
    final = list(victim)[-1]
    loop.stop()
    assert not errors, errors
    assert results == solo
    assert final.finish_reason == "abort"
    assert_idle(engine)


def test_bad_requests_leave_the_engine_untouched(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=64, block_size=16)
    keep = engine.add_request([1, 2, 3], "a0", SamplingParams(max_tokens=4))
    cases = [
        (KeyError, "unknown adapter 'nope'", dict(prompt=[1], adapter="nope")),
        (ValueError, "maximum context length is 256 tokens",
         dict(prompt=[1] * 250, params=SamplingParams(max_tokens=10))),
        (ValueError, "KV cache holds 64 tokens",
         dict(prompt=[1] * 60, params=SamplingParams(max_tokens=10))),
        (ValueError, "token ids must be integers in \\[0, 97\\)", dict(prompt=[1, 97])),
        (ValueError, "token ids must be integers", dict(prompt=[1, "a"])),
        (ValueError, "empty prompt", dict(prompt=[])),
        (ValueError, "text prompts need a tokenizer", dict(prompt="hello")),
        (ValueError, "already in use", dict(prompt=[1], request_id=keep)),
        (TypeError, "expected SamplingParams", dict(prompt=[1], params={"max_tokens": 3})),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg):
            engine.add_request(**kw)
    for kw, msg in [(dict(temperature=-1.0), "temperature: expected >= 0"),
                    (dict(top_p=0.0), "top_p: expected in \\(0, 1\\]"),
                    (dict(top_p=float("nan")), "top_p"), (dict(max_tokens=0), "max_tokens"),
                    (dict(top_k=-2), "top_k"), (dict(seed=-1), "seed"), (dict(stop=[""]), "stop")]:
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**kw)
    assert engine.adapters.entries["a0"].refs == 1  # only `keep`
    done = engine.run_until_done()
    assert done[keep].token_ids == reference_greedy(fn, ads["a0"], [1, 2, 3], 4)
    assert_idle(engine)


def test_merge_is_refused_while_serving_and_merged_requests_run(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=512)
    r = engine.add_request([4, 4], "a1", SamplingParams(max_tokens=6))
    with pytest.raises(ValueError, match="request\\(s\\) are being served"):
        rt.merge("a1")
    unmerged = engine.run_until_done()[r].token_ids
    rt.merge("a1")
    with pytest.raises(ValueError, match="merged with 'a1'"):
        engine.add_request([4, 4], "a0")
    r = engine.add_request([4, 4], "a1", SamplingParams(max_tokens=6))
    assert engine.run_until_done()[r].token_ids == unmerged
    rt.unmerge()
    assert_idle(engine)
    assert isinstance(rt, uora_rt.Runtime)


def test_no_request_is_admitted_while_the_weights_are_being_merged(tmp_path):
    """merge() from another thread while requests arrive: from its idle check to the end of the
    fold, every request is refused (before, one could pass the merged-rule check before the
    fold began and run on half-folded weights), and nothing is left counted."""
    import threading

    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=512)
    folding, finish = threading.Event(), threading.Event()
    fold = rt._fold

    def slow_fold(name, sign):
        folding.set()
        assert finish.wait(30)
        fold(name, sign)

    rt._fold = slow_fold
    merger = threading.Thread(target=rt.merge, args=("a1",))
    merger.start()
    try:
        assert folding.wait(30)
        for adapter in ("a1", "a0", None):
            with pytest.raises(ValueError, match="being merged"):
                engine.add_request([4, 4], adapter, SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="being merged"):
            rt.forward([[4, 4]], adapters=["a1"])
        with pytest.raises(ValueError, match="being merged already"):
            rt.unmerge()
    finally:
        finish.set()
        merger.join(30)
    assert rt.merged == "a1" and rt.manager.in_flight == 0
    r = engine.add_request([4, 4], "a1", SamplingParams(max_tokens=2))
    assert len(engine.run_until_done()[r].token_ids) == 2
    rt._fold = fold
    rt.unmerge()
    assert_idle(engine)


def test_asyncio_streams_get_every_output_in_order(tmp_path):
    """The loop hands a step's outputs to an event loop in one batch: every stream still sees
    each of its outputs once, in order, ending with the finished one, equal to a plain run."""
    import asyncio

    fn, base, ads = build(tmp_path, n_adapters=2)
    prompts = random_prompts(6, seed=21)
    names = ["a0", None, "a1", "a0", None, "a1"]
    params = SamplingParams(max_tokens=7)
    plain = Engine(load(base, ads), kv_cache_tokens=1024)
    want = [plain.add_request(p, n, params) for p, n in zip(prompts, names)]
    done = plain.run_until_done()
    engine = Engine(load(base, ads), kv_cache_tokens=1024)
    loop = EngineLoop(engine).start()

    async def consume(p, n):
        outs = [o async for o in loop.submit(p, n, params, asyncio_loop=asyncio.get_running_loop())]
        return outs

    async def main():
        return await asyncio.gather(*(consume(p, n) for p, n in zip(prompts, names)))

    try:
        got = asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        loop.stop()
    for outs, rid in zip(got, want):
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert [t for o in outs for t in o.new_token_ids] == done[rid].token_ids
        assert outs[-1].token_ids == done[rid].token_ids
    assert_idle(engine)
