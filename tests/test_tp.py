"""Tensor parallelism on the CPU: gloo, 2 processes (the driver and one worker). TP=2 against
the single-process runtime (TP=1) and against transformers + PEFT VeRA; every runtime is closed
and its workers are checked to be gone."""

import threading

import pytest
import torch
import torch.distributed as dist
from conftest import MODEL_TOL, assert_close
from engine_helpers import assert_idle, build, load, random_prompts
from peft_ref import make_adapter, peft_vera_model
from tp_helpers import closed, short_tp_timeout
from uora_rt import Engine, EngineLoop, SamplingParams

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


_short_timeout = pytest.fixture(scope="module", autouse=True)(short_tp_timeout)


@pytest.fixture(scope="module", params=["llama", "llama_mha"])
def pair(request, tmp_path_factory):
    """(fn, ads, TP=1 runtime, TP=2 runtime) on a GQA base (4 heads, 2 KV heads) and an MHA one
    with every bias; adapters of three projection families, one with reinit events."""
    fn, base, ads = build(tmp_path_factory.mktemp(request.param), request.param)
    rt1, rt2 = load(base, ads), load(base, ads, tensor_parallel=2)
    yield fn, ads, rt1, rt2
    closed(rt2)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (4, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, 8:] = 0  # right padding
    return ids, mask


def test_tp2_logits_equal_tp1_and_peft(pair):
    fn, ads, rt1, rt2 = pair
    ids, mask = _batch()
    names = ["a0", None, "a1", "a2"]
    got = rt2.forward(ids, mask, adapters=names).logits
    want = rt1.forward(ids, mask, adapters=names).logits
    valid = mask.bool()
    assert_close(got[valid], want[valid], torch.float32, table=MODEL_TOL)
    for row in (0, 2):  # rows without padding: transformers + PEFT VeRA, one sequence each
        ref = peft_vera_model(fn(), ads[names[row]])(ids[row:row + 1]).logits[0]
        assert_close(got[row], ref, torch.float32, table=MODEL_TOL)


def _trace(engine, arrivals):
    """arrivals: {step: [(prompt, adapter, max_tokens)]} -> final token ids in arrival order."""
    order, done, step = [], {}, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, name, n in arrivals.get(step, []):
            order.append(engine.add_request(prompt, name, SamplingParams(max_tokens=n)))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        step += 1
    return [(done[r].token_ids, done[r].finish_reason) for r in order]


@pytest.mark.parametrize("attention", ["cpp", "torch"])
def test_engine_greedy_equals_tp1(pair, attention):
    _, _, rt1, rt2 = pair
    prompts = random_prompts(7, seed=3, hi=40)
    names = ["a0", None, "a1", "a2", "a1", None, "a0"]
    at = [0, 0, 1, 2, 4, 6, 9]
    arrivals = {}
    for p, n, s, k in zip(prompts, names, at, [9, 4, 7, 10, 3, 8, 5]):
        arrivals.setdefault(s, []).append((p, n, k))
    # 16 tokens a step: prompts are chunked, later chunks read their context from the cache.
    runs = []
    for rt in (rt1, rt2):
        engine = Engine(rt, kv_cache_tokens=1024, max_step_tokens=16, attention=attention)
        runs.append(_trace(engine, arrivals))
        assert_idle(engine)
        engine.close()
    assert runs[1] == runs[0]


def test_prefix_caching_under_tp_equals_tp1_without(pair):
    """The driver decides what is cached; the workers read the same blocks through the page
    tables each step carries."""
    _, _, rt1, rt2 = pair
    system = random_prompts(1, seed=4, lo=35, hi=35)[0]
    prompts = [system + p for p in random_prompts(4, seed=5, hi=9)]
    names = ["a1", None, "a1", None]
    arrivals = {2 * i: [(p, n, 5)] for i, (p, n) in enumerate(zip(prompts, names))}
    runs = []
    for rt, caching in ((rt1, False), (rt2, True)):
        engine = Engine(rt, kv_cache_tokens=1024, block_size=8, max_step_tokens=16,
                        enable_prefix_caching=caching)
        runs.append(_trace(engine, arrivals))
        if caching:
            assert engine.prefix_cache_stats["hits"] == 2 * 32  # the later two read 4 blocks
        assert_idle(engine)
        engine.close()
    assert runs[1] == runs[0]


def test_generate_equals_tp1(pair):
    _, _, rt1, rt2 = pair
    prompts = random_prompts(3, seed=6)
    names = ["a2", None, "a1"]
    want = rt1.generate(prompts, adapters=names, max_new_tokens=6)
    assert rt2.generate(prompts, adapters=names, max_new_tokens=6) == want


def test_openai_fields_under_tp_equal_tp1(pair):
    """n (each sequence prefills its prompt: the KV cache is on the workers too), logprobs,
    prompt logprobs, penalties and logit_bias: the same under TP=2 as alone."""
    _, _, rt1, rt2 = pair
    prompt = random_prompts(1, seed=11, lo=20, hi=20)[0]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=3, n=3, logprobs=2,
                            prompt_logprobs=1, repetition_penalty=1.3, presence_penalty=0.5,
                            logit_bias={7: 2.0}, ignore_eos=True)
    runs = []
    for rt in (rt1, rt2):
        engine = Engine(rt, kv_cache_tokens=512)
        seen = []
        engine.add_request(prompt, "a1", params, on_output=seen.append)
        engine.run_until_done()
        finals = sorted((o for o in seen if o.finished), key=lambda o: o.index)
        runs.append((finals, dict(engine.stats)))
        assert_idle(engine)
        engine.close()
    (one, s1), (two, s2) = runs
    assert s1["forks"] == 2 and s2["forks"] == 0 and s2["fork_prefills"] == 2
    assert [o.token_ids for o in two] == [o.token_ids for o in one]
    for a, b in zip(one, two):
        assert [e.top[0][0] for e in a.logprobs] == [e.top[0][0] for e in b.logprobs]
        torch.testing.assert_close(torch.tensor([e.logprob for e in b.logprobs]),
                                   torch.tensor([e.logprob for e in a.logprobs]),
                                   atol=2e-4, rtol=2e-4)
        assert len(b.prompt_logprobs) == len(prompt)


def test_adapter_add_remove_under_tp(pair, tmp_path):
    fn, _, rt1, rt2 = pair
    extra = make_adapter(fn, tmp_path / "extra.uora", targets=("v_proj", "o_proj", "up_proj"),
                         seed=7, lam_seed=4, scale=1.0, reinit=True)
    prompt = random_prompts(1, seed=5, lo=12, hi=12)[0]
    engines = [Engine(rt, kv_cache_tokens=512) for rt in (rt1, rt2)]
    before = []
    for rt, engine in zip((rt1, rt2), engines):
        assert rt.add_adapter(extra, "extra") == "extra"
        rid = engine.add_request(prompt, "extra", SamplingParams(max_tokens=6))
        keep = engine.add_request(prompt, "a1", SamplingParams(max_tokens=6))
        done = engine.run_until_done()
        before.append((done[rid].token_ids, done[keep].token_ids))
    assert before[1] == before[0]
    ids, mask = _batch(1)
    names = ["extra", "a0", None, "extra"]
    assert_close(rt2.forward(ids, mask, names).logits[mask.bool()],
                 rt1.forward(ids, mask, names).logits[mask.bool()], torch.float32,
                 table=MODEL_TOL)
    # Removed while a request holds it: that request finishes with it, new ones fail.
    outs = []
    for rt, engine in zip((rt1, rt2), engines):
        rid = engine.add_request(prompt, "extra", SamplingParams(max_tokens=6))
        engine.step()
        rt.remove_adapter("extra")
        with pytest.raises(KeyError, match="extra"):
            engine.add_request(prompt, "extra")
        with pytest.raises(KeyError, match="extra"):
            rt.forward(ids, mask, names)
        keep = engine.add_request(prompt, "a1", SamplingParams(max_tokens=6))
        done = engine.run_until_done()
        outs.append((done[rid].token_ids, done[keep].token_ids))
        assert_idle(engine)
        engine.close()
    assert outs[1] == outs[0] == before[0]
    assert "extra" not in rt2.adapters and rt2.adapters == rt1.adapters


def test_adapters_change_from_another_thread_while_serving(pair, tmp_path):
    """A thread adds and removes adapters while the loop steps; "wide" joins a0's projection
    family and widens it with a row-parallel module (o_proj), so a forward's ranks must agree
    on which shrinks ride in the reduce."""
    fn, _, rt1, rt2 = pair
    wide = make_adapter(fn, tmp_path / "wide.uora", targets=("o_proj",), lam_seed=8, scale=1.0)
    prompts = random_prompts(8, seed=9)
    names = ["a0", "a1", None, "a2"] * 2
    solo = Engine(rt1, kv_cache_tokens=1024)
    rids = [solo.add_request(p, n, SamplingParams(max_tokens=6)) for p, n in zip(prompts, names)]
    done = solo.run_until_done()
    want = [done[r].token_ids for r in rids]
    engine = Engine(rt2, kv_cache_tokens=1024, max_step_tokens=16)
    loop = EngineLoop(engine).start()

    def churn():
        for k in range(6):
            rt2.add_adapter(wide, f"w{k}")
            if k % 2:
                rt2.remove_adapter(f"w{k - 1}")

    thread = threading.Thread(target=churn)
    thread.start()
    streams = [loop.submit(p, n, SamplingParams(max_tokens=6)) for p, n in zip(prompts, names)]
    got = [list(s)[-1].token_ids for s in streams]
    thread.join(60)
    late = list(loop.submit(prompts[0], "w5", SamplingParams(max_tokens=6)))[-1]
    loop.stop()
    engine.close()
    assert got == want
    assert rt2.manager.entries["w5"].family is rt2.manager.entries["a0"].family
    rt1.add_adapter(wide, "w5")
    ref = solo.add_request(prompts[0], "w5", SamplingParams(max_tokens=6))
    assert late.token_ids == solo.run_until_done()[ref].token_ids
    for k in (1, 3, 5):
        rt2.remove_adapter(f"w{k}")
    rt1.remove_adapter("w5")
    assert rt2.adapters == rt1.adapters
