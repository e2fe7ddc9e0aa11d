"""Async scheduling (Engine's default) against the synchronous loop (async_scheduling=False) and
against transformers/PEFT: the same outputs, field for field and in the same order per sequence
(one step() later), through EOS, stop strings, max_tokens, aborts, preemption, adapter changes,
n > 1, logprobs, penalties and prefix-cache hits; the steps that must run synchronously say so."""

import pytest

import uora_rt
from engine_helpers import BASES, assert_idle, build, load, random_prompts, reference_greedy
from peft_ref import make_adapter
from server_helpers import tiny_base
from uora_rt import Engine, SamplingParams


def _key(o):  # (the seed an unseeded request drew differs from engine to engine)
    return (o.new_token_ids, o.token_ids, o.text, o.new_text, o.finished, o.finish_reason,
            o.stop_reason, o.error, o.index, o.cached_tokens, o.prompt_tokens, o.logprobs,
            o.new_logprobs, o.cumulative_logprob, o.prompt_logprobs)


def drive(engine, requests, events=None, max_calls=5000):
    """requests: {call: [(name, prompt, adapter, params)]} added before that step() call;
    events: {call: fn(engine, ids)} run before it (ids: name -> request id). Returns
    ({(name, index): [output keys in order]}, ids)."""
    seqs, ids, events = {}, {}, events or {}
    names = {}
    for call in range(max_calls):
        for name, prompt, adapter, params in requests.get(call, ()):
            ids[name] = engine.add_request(prompt, adapter, params)
            names[ids[name]] = name
        if call in events:
            events[call](engine, ids)
        for o in engine.step():
            seqs.setdefault((names[o.request_id], o.index), []).append(_key(o))
        if not engine.has_unfinished() and call > max(list(requests) + list(events)):
            return seqs, ids
    raise AssertionError("the engine did not finish")


def both(make_engine, requests, events=None, overlap=False):
    """The same script on a synchronous and an async engine (overlap: its CPU forward in a
    worker thread, beside the host's work, as on a GPU); asserts equal outputs."""
    sync, async_ = make_engine(async_scheduling=False), make_engine()
    async_.runner.cpu_overlap = overlap
    assert async_.async_scheduling and not sync.async_scheduling
    want, _ = drive(sync, requests, events)
    got, ids = drive(async_, requests, events)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == want[k], k
    assert_idle(sync)
    assert_idle(async_)
    return got, ids, sync, async_


def _final(seqs, name, index=0):
    return seqs[(name, index)][-1]


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_and_seeded_equal_sync_and_peft(tmp_path, overlap):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    free = reference_greedy(fn, ads["a1"], [9, 8, 7], 12)
    rt.config["eos_token_id"] = free[4]  # greedy requests end by EOS mid-batch
    prompts = random_prompts(8, seed=11)
    adapters = ["a0", None, "a1", "a2", None, "a1", "a0", "a2"]
    greedy = {f"g{i}": (prompts[i], adapters[i], 5 + 3 * i) for i in range(4)}
    reqs = {0: [(n, p, a, SamplingParams(max_tokens=m)) for n, (p, a, m) in greedy.items()],
            3: [("eos", [9, 8, 7], "a1", SamplingParams(max_tokens=12))]}
    reqs[2] = [(f"s{i}", prompts[i], adapters[i], SamplingParams(
        max_tokens=9 + i, temperature=[0.7, 1.0, 1.3, 0.9][i - 4],
        top_p=[1.0, 0.9, 1.0, 0.8][i - 4], top_k=[0, 0, 20, 5][i - 4], seed=100 + i))
        for i in range(4, 8)]
    got, _, _, eng = both(lambda **kw: Engine(rt, kv_cache_tokens=2048, max_step_tokens=24, **kw),
                          reqs, overlap=overlap)
    for n, (p, a, m) in greedy.items():
        ref, reason = reference_greedy(fn, ads[a] if a else None, p, m, with_reason=True)
        assert _final(got, n)[1] == ref and _final(got, n)[5] == reason
    assert _final(got, "eos")[1] == free[:4] and _final(got, "eos")[6] == free[4]
    # nothing here needs a synchronous step on the CPU
    assert all(eng.stats[k] == 0 for k in eng.stats if k.startswith("sync_"))
    assert eng.stats["discarded_tokens"] >= 1  # the EOS request ran one step past its end


def test_stop_strings_and_max_tokens_equal_sync(tmp_path):
    rt = uora_rt.load(tiny_base(tmp_path / "base"))
    probe = Engine(rt, kv_cache_tokens=1024)
    r = probe.add_request("hello there", None, SamplingParams(max_tokens=20, ignore_eos=True))
    text = probe.run_until_done()[r].text
    stop = text[6:8]
    assert stop and text.index(stop) >= 1
    reqs = {0: [("stop", "hello there", None, SamplingParams(max_tokens=20, ignore_eos=True,
                                                               stop=[stop])),
                ("len", "hello there", None, SamplingParams(max_tokens=20, ignore_eos=True)),
                ("hot", "tell me", None, SamplingParams(max_tokens=15, temperature=1.0, seed=3,
                                                        stop=["e"]))],
            1: [("one", "a", None, SamplingParams(max_tokens=1, ignore_eos=True))]}
    got, _, _, eng = both(lambda **kw: Engine(rt, kv_cache_tokens=1024, **kw), reqs)
    out = _final(got, "stop")
    assert out[5] == "stop" and out[6] == stop and out[2] == text[:text.index(stop)]
    assert _final(got, "len")[2] == text and _final(got, "len")[5] == "length"
    assert len(_final(got, "one")[1]) == 1
    assert eng.stats["discarded_tokens"] >= 1  # the stop string was seen one step late


@pytest.mark.parametrize("overlap", [False, True])
def test_aborts_mid_stream_equal_sync(tmp_path, overlap):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    ps = random_prompts(4, seed=5)
    reqs = {0: [("a", ps[0], "a0", SamplingParams(max_tokens=40)),
                ("b", ps[1], None, SamplingParams(max_tokens=40, temperature=0.8, seed=9)),
                ("c", ps[2], "a1", SamplingParams(max_tokens=40))],
            1: [("d", ps[3], "a2", SamplingParams(max_tokens=40, n=2, seed=4, temperature=1.0))]}

    def abort(*names, index=None):
        return lambda engine, ids: [engine.abort(ids[n], index) for n in names]

    events = {4: abort("a"), 7: abort("b", "c"), 9: abort("d", index=1), 12: abort("d")}
    got, _, _, _ = both(lambda **kw: Engine(rt, kv_cache_tokens=2048, max_num_seqs=3, **kw),
                        reqs, events, overlap)
    assert all(_final(got, n)[5] == "abort" for n in "abc")
    assert _final(got, "a")[1] == reference_greedy(fn, ads["a0"], ps[0], 40)[:4]


def failing(rt, fails, **engine_kw):
    """An engine factory for both(): each engine's first step with a sampled row for which
    fails(row) holds raises RuntimeError("injected failure") (on the CPU every path runs the
    step through runner.run)."""
    def make(**kw):
        engine = Engine(rt, **engine_kw, **kw)
        real, failed = engine.runner.run, []

        def run(meta):
            if not failed and any(fails(s) for s in meta.sampled):
                failed.append(True)
                raise RuntimeError("injected failure")
            return real(meta)

        engine.runner.run = run
        return engine
    return make


def _prompt_of(row):
    return row.req.tokens[:row.req.prompt_len]


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_step_fails_only_its_own_requests(tmp_path, overlap):
    """A step that raises fails the requests it ran; a request that entered at the next step
    (launched, with the worker, before the failure was known) still ends as PEFT's greedy."""
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    pa, pb = random_prompts(2, seed=8)
    # the step that feeds a's third token fails
    make = failing(rt, lambda row: _prompt_of(row) == pa and row.start == len(pa) + 2,
                   kv_cache_tokens=2048)
    reqs = {0: [("a", pa, "a0", SamplingParams(max_tokens=20, ignore_eos=True))],
            4: [("b", pb, "a1", SamplingParams(max_tokens=12, ignore_eos=True))]}
    got, _, _, _ = both(make, reqs, overlap=overlap)
    a = _final(got, "a")
    assert a[5] == "abort" and a[7] == "RuntimeError: injected failure"
    assert a[1] == reference_greedy(fn, ads["a0"], pa, 3)
    b = _final(got, "b")
    assert b[5] == "length" and b[7] is None
    assert b[1] == reference_greedy(fn, ads["a1"], pb, 12)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_prefill_leaves_no_cached_blocks(tmp_path, overlap):
    """The blocks of a prefill that raised never become findable: the same prompt sent again
    computes its KV (no cache hit) and ends as PEFT's greedy."""
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    prompt = random_prompts(1, seed=4, lo=40, hi=40)[0]
    # the first prefill of the prompt fails
    make = failing(rt, lambda row: row.start == 0 and _prompt_of(row) == prompt,
                   kv_cache_tokens=2048, block_size=8)
    reqs = {0: [("first", prompt, "a1", SamplingParams(max_tokens=6, ignore_eos=True))],
            5: [("again", prompt, "a1", SamplingParams(max_tokens=6, ignore_eos=True))]}
    got, _, _, _ = both(make, reqs, overlap=overlap)
    assert _final(got, "first")[7] == "RuntimeError: injected failure"
    again = _final(got, "again")
    assert again[9] == 0  # cached_tokens: nothing of the failed prefill was reused
    assert again[1] == reference_greedy(fn, ads["a1"], prompt, 6)


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_with_a_tiny_kv_cache_equals_sync_and_peft(tmp_path, overlap):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    ps = random_prompts(6, seed=2, lo=10, hi=30)
    adapters = ["a0", None, "a1", "a2", "a0", None]
    reqs = {0: [(f"r{i}", p, a, SamplingParams(max_tokens=30, ignore_eos=True))
                for i, (p, a) in enumerate(zip(ps, adapters))]}
    got, _, sync, eng = both(lambda **kw: Engine(rt, kv_cache_tokens=128, block_size=8, **kw),
                             reqs, overlap=overlap)
    assert eng.scheduler.preemptions > 0 and sync.scheduler.preemptions > 0
    for i, (p, a) in enumerate(zip(ps, adapters)):
        assert _final(got, f"r{i}")[1] == reference_greedy(fn, ads[a] if a else None, p, 30)


def test_adapters_added_and_removed_between_steps_equal_sync(tmp_path):
    fn, base, ads = build(tmp_path)
    extra = make_adapter(BASES["llama"], tmp_path / "x.uora", lam_seed=55, scale=1.0)
    runtimes = iter([load(base, ads, slots=1), load(base, ads, slots=1)])

    def add(engine, ids):
        engine.adapters_rt.add_adapter(extra, name="x")

    def remove(engine, ids):
        engine.adapters_rt.remove_adapter("a0")

    def make(**kw):
        rt = next(runtimes)
        engine = Engine(rt, kv_cache_tokens=1024, **kw)
        engine.adapters_rt = rt
        return engine

    reqs = {0: [("a", [7, 7, 7], "a0", SamplingParams(max_tokens=12)),
                ("b", [8, 9], "a1", SamplingParams(max_tokens=6))],
            4: [("x", [8, 9], "x", SamplingParams(max_tokens=7))],  # same family as a0: waits
            5: [("y", [5, 4], "a1", SamplingParams(max_tokens=5, temperature=1.0, seed=8))]}
    got, _, _, _ = both(make, reqs, {2: remove, 3: add})
    assert _final(got, "a")[1] == reference_greedy(fn, ads["a0"], [7, 7, 7], 12)
    assert _final(got, "x")[1] == reference_greedy(fn, extra, [8, 9], 7)


@pytest.mark.parametrize("overlap", [False, True])
def test_n_logprobs_and_penalties_step_synchronously_and_equal_sync(tmp_path, overlap, caplog):
    _, base, ads = build(tmp_path)
    rt = load(base, ads)
    p = random_prompts(2, seed=8, lo=20, hi=20)
    reqs = {0: [("n", p[0], "a2", SamplingParams(n=3, max_tokens=8, temperature=1.0,
                                                 top_p=0.95, seed=77))],
            1: [("best", p[1], "a1", SamplingParams(n=2, best_of=3, max_tokens=5, seed=7,
                                                    temperature=0.9))],
            2: [("plain", p[1], None, SamplingParams(max_tokens=20))],
            5: [("lp", p[1], "a0", SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2)),
                ("pen", p[0], None, SamplingParams(max_tokens=6, repetition_penalty=1.3,
                                                   logit_bias={3: 5.0}, min_tokens=2))]}
    with caplog.at_level("INFO", logger="uora_rt.engine"):
        got, _, _, eng = both(lambda **kw: Engine(rt, kv_cache_tokens=2048, **kw), reqs,
                              overlap=overlap)
    causes = {k[5:]: v for k, v in eng.stats.items() if k.startswith("sync_") and v}
    assert causes.get("fork") == 1 and causes.get("extras", 0) >= 6  # best_of: logprobs
    said = [r.getMessage() for r in caplog.records if "runs synchronously" in r.getMessage()]
    assert len(said) == len(causes)  # one line per cause
    assert [len(got[("n", i)]) for i in range(3)] == [8] * 3
    assert [len(got[("best", i)]) for i in range(3)] == [5] * 3
    assert _final(got, "lp")[11] is not None and len(_final(got, "lp")[11]) == 6


@pytest.mark.parametrize("overlap", [False, True])
def test_prefix_cache_hits_equal_sync(tmp_path, overlap):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    shared = random_prompts(1, seed=3, lo=40, hi=40)[0]
    generated = reference_greedy(fn, ads["a1"], shared + [1, 2], 20)
    assert len(generated) == 20
    reqs = {0: [("first", shared + [1, 2], "a1", SamplingParams(max_tokens=20))],
            6: [("hit", shared + [3], "a1", SamplingParams(max_tokens=8))],
            30: [("own", shared + [1, 2] + generated[:18], "a1", SamplingParams(max_tokens=4)),
                 ("base", shared, None, SamplingParams(max_tokens=4))]}
    got, _, _, eng = both(lambda **kw: Engine(rt, kv_cache_tokens=2048, block_size=8, **kw),
                          reqs, overlap=overlap)
    assert _final(got, "hit")[9] == 40 and _final(got, "base")[9] == 0
    assert _final(got, "own")[9] == 56  # generated tokens' blocks were registered, as in sync
    assert _final(got, "hit")[1] == reference_greedy(fn, ads["a1"], shared + [3], 8)


def test_async_scheduling_is_validated_and_sync_returns_its_own_step(tmp_path):
    _, base, ads = build(tmp_path)
    rt = load(base, ads)
    with pytest.raises(ValueError, match="async_scheduling must be True or False"):
        Engine(rt, async_scheduling="yes")
    sync = Engine(rt, kv_cache_tokens=512, async_scheduling=False)
    sync.add_request([1, 2], None, SamplingParams(max_tokens=3))
    assert len(sync.step()) == 1  # its own step's token
    sync.run_until_done()
    eng = Engine(rt, kv_cache_tokens=512)
    eng.add_request([1, 2], None, SamplingParams(max_tokens=3))
    assert eng.step() == [] and len(eng.step()) == 1  # one step later
    eng.run_until_done()
    assert_idle(eng)
    eng.close()


def test_serve_flag_reaches_the_engine_core(tmp_path):
    import argparse

    from uora_rt.commands.core_process import core_options
    from uora_rt.commands.engine_core import build_engine
    from uora_rt.commands.serve import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    _, base, ads = build(tmp_path)
    rt = load(base, ads)
    for argv, want in (([], True), (["--no-async-scheduling"], False)):
        args = p.parse_args([str(base), "--kv-cache-tokens", "256", *argv])
        opts = core_options(args, [])
        assert opts["async_scheduling"] is want
        assert build_engine(rt, opts).async_scheduling is want
