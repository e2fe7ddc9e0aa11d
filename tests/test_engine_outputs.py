"""The engine's per-step outputs, built in one pass over a step's rows and sharing each
sequence's lists instead of copying them: every output, read after the run has ended, still
says what it said at its own step, and equals transformers' greedy generate step by step; the
columns a step reuses while the same requests decode (sampling rows, block tables) give every
request what it gets when it runs alone."""

import pytest

from engine_helpers import assert_idle, build, load, random_prompts, reference_greedy
from uora_rt import Engine, RequestOutput, SamplingParams


def _run_keep_all(engine, jobs):
    """jobs: [(prompt, adapter, params)]; every output object of every step, per request id,
    read only after the engine has finished."""
    ids = [engine.add_request(p, a, sp) for p, a, sp in jobs]
    outs = {rid: [] for rid in ids}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id].append(o)
    return ids, outs


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_each_step_output_equals_transformers_greedy_prefix(tmp_path, async_scheduling):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    prompts = random_prompts(9, seed=5)
    adapters = [None, "a0", "a1", "a2", None, "a1", "a0", None, "a2"]
    # max_tokens differ, so sequences end at different steps and the decode batch changes
    # (block_size 4: rows get new blocks every few steps; a small KV cache preempts some)
    jobs = [(p, a, SamplingParams(max_tokens=6 + 3 * i)) for i, (p, a) in
            enumerate(zip(prompts, adapters))]
    engine = Engine(rt, kv_cache_tokens=160, block_size=4, max_step_tokens=32,
                    async_scheduling=async_scheduling)
    ids, outs = _run_keep_all(engine, jobs)
    assert engine.scheduler.preemptions > 0  # the schedule changed under the outputs
    for rid, (p, a, sp) in zip(ids, jobs):
        ref, reason = reference_greedy(fn, ads[a] if a else None, p, sp.max_tokens,
                                       with_reason=True)
        seq = outs[rid]
        assert [t for o in seq for t in o.new_token_ids] == ref
        for k, o in enumerate(seq):  # each as of its own step, though read only now
            assert o.token_ids == ref[:len(o.token_ids)]
            assert len(o.token_ids) == sum(len(x.new_token_ids) for x in seq[:k + 1])
            assert o.finished == (k == len(seq) - 1) and o.prompt_tokens == len(p)
        assert seq[-1].token_ids == ref and seq[-1].finish_reason == reason
    assert_idle(engine)


def test_logprobs_of_each_output_are_those_of_its_step(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=512, block_size=4)
    params = SamplingParams(max_tokens=7, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    prompt = random_prompts(1, seed=3, lo=6, hi=6)[0]
    (rid,), outs = _run_keep_all(engine, [(prompt, "a1", params)])
    seq = outs[rid]
    final = seq[-1]
    assert len(final.logprobs) == 7 and len(final.prompt_logprobs) == len(prompt)
    assert [e.token_id for e in final.logprobs] == final.token_ids
    for k, o in enumerate(seq):
        assert o.logprobs == final.logprobs[:k + 1]
        assert o.new_logprobs == [final.logprobs[k]]
        assert o.prompt_logprobs == final.prompt_logprobs
    # a list read from an output is its own: changing it changes no other output
    seq[0].logprobs.clear()
    seq[0].prompt_logprobs.clear()
    assert len(seq[1].logprobs) == 2 and len(seq[1].prompt_logprobs) == len(prompt)
    assert_idle(engine)


def test_sampled_rows_in_a_changing_batch_equal_each_request_alone(tmp_path):
    """The sampling columns and block tables a step reuses while its rows stay the same must
    follow every change of the batch: each seeded request draws what it draws alone."""
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    prompts = random_prompts(6, seed=8)
    kinds = [dict(temperature=0.8, seed=1), dict(temperature=0.0),
             dict(temperature=1.2, top_k=5, seed=2), dict(temperature=0.9, top_p=0.8, seed=3),
             dict(temperature=0.0), dict(temperature=1.0, seed=4)]
    jobs = [(p, [None, "a0", "a1"][i % 3], SamplingParams(max_tokens=5 + 4 * i, **kw))
            for i, (p, kw) in enumerate(zip(prompts, kinds))]
    alone = []
    for job in jobs:
        engine = Engine(rt, kv_cache_tokens=512, block_size=4)
        (rid,), outs = _run_keep_all(engine, [job])
        alone.append(outs[rid][-1].token_ids)
    # three at a time: a request that ends is replaced by a waiting one in the next step
    # (synchronous: as many rows as before, other requests in them)
    for async_scheduling in (False, True):
        together = Engine(rt, kv_cache_tokens=512, block_size=4, max_num_seqs=3,
                          async_scheduling=async_scheduling)
        ids, outs = _run_keep_all(together, jobs)
        assert [outs[rid][-1].token_ids for rid in ids] == alone


def test_request_output_constructor_equality_and_assignment():
    a = RequestOutput("r", None, [1, 2], "ab", False, None, 3, [2], "b")
    b = RequestOutput("r", None, [1, 2], "ab", False, None, 3, [2], "b")
    assert a == b and "token_ids=[1, 2]" in repr(a)
    src = [9, 9, 1, 2]
    c = RequestOutput.sharing("r", None, src, 2, 4, "ab", False, None, 3, [2], "b", None, None,
                              None, 0, None, None, None, None, 0)
    src.append(5)  # the sequence goes on: this output keeps its step's view
    assert c == a and c.token_ids == [1, 2]
    c.token_ids = [7]
    assert c.token_ids == [7] and c != a
