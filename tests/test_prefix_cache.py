"""Prefix caching in the engine: greedy outputs with the cache equal outputs without it and
transformers + PEFT VeRA (shared system prompts across adapters and none, multi-turn histories,
preemption under a tiny KV budget, abort mid-prefill), and a request never reads KV computed
under another adapter, a previous file of the same name, or other weights. Every test ends with
the block pool idle and its invariants checked."""

import pytest

from engine_helpers import assert_idle, build, load, random_prompts, reference_greedy
from peft_ref import make_adapter
from uora_rt import Engine, SamplingParams

BS = 8  # tokens per block: prompts of a few dozen tokens span several full blocks


def run(engine, arrivals, ignore_eos=False):
    """arrivals: {step: [(prompt, adapter, max_tokens)]} -> final outputs in arrival order."""
    order, done, step = [], {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, name, n in arrivals.get(step, []):
            params = SamplingParams(max_tokens=n, ignore_eos=ignore_eos)
            order.append(engine.add_request(prompt, name, params))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return [done[r] for r in order]


def idle(engine):
    assert_idle(engine)
    engine.allocator.check(held={})


def one(engine, prompt, name, n=6):
    rid = engine.add_request(prompt, name, SamplingParams(max_tokens=n))
    return engine.run_until_done()[rid]


@pytest.mark.parametrize("attention", ["cpp", "torch"])
def test_shared_system_prompts_across_adapters_and_none(tmp_path, attention):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    system = random_prompts(1, seed=11, lo=37, hi=37)[0]  # 4 full blocks and a partial one
    suffixes = random_prompts(8, seed=12, lo=1, hi=15)
    names = ["a0", "a1", None, "a2", "a2", "a0", None, "a1"]
    steps = [0, 0, 1, 3, 3, 5, 8, 8]  # a2's two arrive together: the second waits for the
                                      # first's blocks rather than compute them again
    lengths = [7, 5, 9, 4, 6, 8, 3, 5]
    arrivals = {}
    for s, suffix, name, k in zip(steps, suffixes, names, lengths):
        arrivals.setdefault(s, []).append((system + suffix, name, k))
    runs = {}
    for caching in (True, False):
        engine = Engine(rt, kv_cache_tokens=2048, max_step_tokens=24, block_size=BS,
                        attention=attention, enable_prefix_caching=caching)
        runs[caching] = (run(engine, arrivals), engine.stats["prefill_tokens"])
        idle(engine)
    (on, computed_on), (off, computed_off) = runs[True], runs[False]
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    for suffix, name, k, out in zip(suffixes, names, lengths, on):
        assert out.token_ids == reference_greedy(fn, ads.get(name), system + suffix, k), name
    # the first request of each adapter (and of none) computes the system prompt's 4 full
    # blocks; every later one reads them, never another adapter's
    seen, want = set(), []
    for name in names:
        want.append(32 if name in seen else 0)
        seen.add(name)
    assert [o.cached_tokens for o in on] == want
    assert all(o.cached_tokens == 0 for o in off)
    assert computed_on == computed_off - sum(want)


def test_multi_turn_histories_read_their_earlier_turns(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    users = random_prompts(6, seed=21, lo=3, hi=12)
    for name in ("a1", None):
        engines = {c: Engine(rt, kv_cache_tokens=2048, block_size=BS,
                             enable_prefix_caching=c) for c in (True, False)}
        history = random_prompts(1, seed=20, lo=19, hi=19)[0]
        for turn, user in enumerate(users[:3]):
            prompt = history + user
            outs = {c: run(e, {0: [(prompt, name, 5)]}, ignore_eos=True)[0]
                    for c, e in engines.items()}
            assert outs[True].token_ids == outs[False].token_ids, (name, turn)
            ref = reference_greedy(fn, ads.get(name), prompt, 5)
            assert outs[True].token_ids[:len(ref)] == ref
            # every full block of the previous turn that was computed (all its tokens but the
            # last output, which is never fed back) is read, not computed again
            cached = 0 if turn == 0 else (len(history) - 1) // BS * BS
            assert outs[True].cached_tokens == cached
            history = prompt + outs[True].token_ids
        for e in engines.values():
            idle(e)


def test_preemption_under_a_tiny_kv_budget(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    system = random_prompts(1, seed=31, lo=24, hi=24)[0]
    prompts = [system + p for p in random_prompts(8, seed=32, lo=4, hi=16)]
    names = ["a0", "a1", None, "a0"] * 2
    big = Engine(rt, kv_cache_tokens=4096, enable_prefix_caching=False)
    want = [o.token_ids for o in run(big, {0: [(p, n, 20) for p, n in zip(prompts, names)]})]
    # 8 requests of up to 60 tokens each in 128 tokens of KV: cached blocks are evicted,
    # requests preempted and re-admitted (reading what is still cached)
    small = Engine(rt, kv_cache_tokens=128, block_size=BS, max_step_tokens=64)
    arrivals = {2 * i: [(p, n, 20)] for i, (p, n) in enumerate(zip(prompts, names))}
    got = run(small, arrivals)
    assert small.scheduler.preemptions > 0 and small.allocator.evicted > 0
    assert [o.token_ids for o in got] == want
    assert any(o.cached_tokens for o in got)
    assert want[1] == reference_greedy(fn, ads["a1"], prompts[1], 20)
    idle(small)


def test_abort_mid_prefill_keeps_what_was_computed(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=1024, block_size=BS, max_step_tokens=16)
    prompt = random_prompts(1, seed=41, lo=100, hi=100)[0]
    first = engine.add_request(prompt, "a1", SamplingParams(max_tokens=4))
    engine.step()
    # the same prompt while the first computes it: it waits for those blocks rather than
    # computing them twice
    second = engine.add_request(prompt, "a1", SamplingParams(max_tokens=4))
    for _ in range(2):
        engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    engine.abort(first)  # 48 of its 100 prompt tokens are computed
    outs = {o.request_id: o for o in engine.step()}
    assert outs[first].finish_reason == "abort"
    done = engine.run_until_done()
    assert done[second].cached_tokens == 48
    assert done[second].token_ids == reference_greedy(fn, ads["a1"], prompt, 4)
    idle(engine)


def test_a_different_file_under_the_same_name_never_reads_the_old_blocks(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=2048, block_size=BS)
    old = make_adapter(fn, tmp_path / "old.uora", targets=("k_proj", "v_proj"), lam_seed=51,
                       scale=1.0)
    new = make_adapter(fn, tmp_path / "new.uora", targets=("k_proj", "v_proj"), lam_seed=52,
                       scale=1.0)
    prompt = random_prompts(1, seed=53, lo=40, hi=40)[0]
    want_old, want_new = (reference_greedy(fn, p, prompt, 6) for p in (old, new))
    assert want_old != want_new  # the adapters' KV differ: a wrong hit would show
    rt.add_adapter(old, name="t")
    assert one(engine, prompt, "t").token_ids == want_old
    again = one(engine, prompt, "t")
    assert (again.token_ids, again.cached_tokens) == (want_old, 32)
    for other in ("a0", None):  # another adapter, or none, never reads t's blocks
        assert one(engine, prompt, other).cached_tokens == 0
    newer = make_adapter(fn, tmp_path / "newer.uora", targets=("k_proj", "v_proj"),
                         lam_seed=54, scale=1.0)
    for path in (new, newer):  # retrained and reloaded under the old name, twice
        rt.remove_adapter("t")
        rt.add_adapter(path, name="t")
        out = one(engine, prompt, "t")
        want = reference_greedy(fn, path, prompt, 6)
        assert (out.token_ids, out.cached_tokens) == (want, 0)
        assert one(engine, prompt, "t").cached_tokens == 32
    # the first file's bytes again, under its old name or another: the same adapter to the
    # KV cache, so its blocks (still cached) are read
    rt.remove_adapter("t")
    rt.add_adapter(old, name="t")
    rt.add_adapter(old, name="twin")
    for name in ("t", "twin"):
        out = one(engine, prompt, name)
        assert (out.token_ids, out.cached_tokens) == (want_old, 32)
    ids = {e.kv_identity for e in rt.manager.entries.values()}
    assert len(ids) == len(rt.manager.entries) - 1  # t and twin share one, the rest differ
    idle(engine)


def test_merging_changes_the_weights_and_so_the_keys(tmp_path):
    _, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=1024, block_size=BS)
    prompt = random_prompts(1, seed=61, lo=30, hi=30)[0]
    plain = one(engine, prompt, None)
    unmerged = one(engine, prompt, "a1")
    rt.merge("a1")
    merged = one(engine, prompt, "a1")  # the merged weights: no block of before is read
    assert merged.cached_tokens == 0 and merged.token_ids == unmerged.token_ids
    assert one(engine, prompt, "a1").cached_tokens == 24
    rt.unmerge()  # the weights are back, though not bit for bit: nothing of before is read
    out = one(engine, prompt, None)
    assert out.cached_tokens == 0 and out.token_ids == plain.token_ids
    idle(engine)


def test_caching_off_keys_nothing_and_bad_flag_is_refused(tmp_path):
    _, base, ads = build(tmp_path, n_adapters=1)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=512, block_size=BS, enable_prefix_caching=False)
    prompt = random_prompts(1, seed=71, lo=30, hi=30)[0]
    for _ in range(2):
        assert one(engine, prompt, "a0").cached_tokens == 0
    assert engine.allocator.num_cached == 0
    assert engine.prefix_cache_stats["hits"] == 0
    idle(engine)
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False"):
        Engine(rt, kv_cache_tokens=512, enable_prefix_caching="yes")


def test_stats_count_prompt_tokens_per_adapter(tmp_path):
    _, base, ads = build(tmp_path, n_adapters=1)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=512, block_size=BS)
    prompt = random_prompts(1, seed=81, lo=20, hi=20)[0]
    for name in ("a0", "a0", None):
        one(engine, prompt, name)
    stats = engine.prefix_cache_stats
    assert stats["per_adapter"] == {"a0": (40, 16), None: (20, 0)}
    assert (stats["queries"], stats["hits"]) == (60, 16)
    assert stats["cached_blocks"] >= 4  # at least the prompt's two full blocks per identity
    idle(engine)


class _EagerGraphs:
    """Stands in for the CUDA graphs on the CPU: Engine.warmup sends its dummy requests, and
    every step runs eagerly (run() answers "no graph for this step")."""

    max_bucket, captures = 4, 0

    def run(self, meta):
        return None


def test_warmup_requests_are_not_counted(tmp_path):
    _, base, ads = build(tmp_path, n_adapters=1)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=512, block_size=BS, max_num_seqs=4)
    prompt = random_prompts(1, seed=82, lo=20, hi=20)[0]
    one(engine, prompt, "a0")
    before = engine.prefix_cache_stats
    engine.runner.graphs = _EagerGraphs()
    steps = engine.stats["steps"]
    engine.warmup(adapters=(None, "a0"))
    assert engine.stats["steps"] > steps  # the warm-up did run its requests
    engine.runner.graphs = None
    assert engine.prefix_cache_stats["per_adapter"] == before["per_adapter"] == {"a0": (20, 0)}
    one(engine, prompt, "a0")
    assert engine.prefix_cache_stats["per_adapter"] == {"a0": (40, 16)}
    idle(engine)


def test_bases_with_biases_and_qwen2(tmp_path):
    """The same prompts twice on the other tiny bases: the second run reads its prefixes and
    equals the first."""
    for kind in ("qwen2", "llama_mha"):
        fn, base, ads = build(tmp_path / kind, kind)
        rt = load(base, ads)
        engine = Engine(rt, kv_cache_tokens=1024, block_size=BS, max_step_tokens=32)
        prompts = random_prompts(3, seed=91, lo=20, hi=40)
        arrivals = {0: [(p, n, 5) for p, n in zip(prompts, ["a0", None, "a1"])]}
        first, second = run(engine, arrivals), run(engine, arrivals)
        assert [o.token_ids for o in first] == [o.token_ids for o in second]
        assert all(o.cached_tokens == 0 for o in first)
        assert [o.cached_tokens for o in second] == [(len(p) - 1) // BS * BS for p in prompts]
        assert first[0].token_ids == reference_greedy(fn, ads["a0"], prompts[0], 5)
        idle(engine)


def test_prompt_logprobs_compute_the_whole_prompt_and_equal_the_uncached_ones(tmp_path):
    """A request asking for prompt logprobs needs every prompt position's logits: it never
    starts from cached blocks (cached_tokens 0), and its logprobs equal those of an engine
    without the cache."""
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    prompt = random_prompts(1, seed=21, lo=30, hi=30)[0]
    got = {}
    for caching in (True, False):
        engine = Engine(rt, kv_cache_tokens=1024, block_size=BS,
                        enable_prefix_caching=caching)
        one(engine, prompt, "a1")  # warms the cache (when on)
        rid = engine.add_request(prompt, "a1", SamplingParams(max_tokens=2, prompt_logprobs=0))
        got[caching] = engine.run_until_done()[rid]
        idle(engine)
    on, off = got[True], got[False]
    assert on.cached_tokens == 0 and len(on.prompt_logprobs) == len(prompt)
    assert [e.logprob for e in on.prompt_logprobs[1:]] == \
        [e.logprob for e in off.prompt_logprobs[1:]]
    assert on.token_ids == off.token_ids
