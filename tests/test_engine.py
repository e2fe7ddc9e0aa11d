"""The engine against transformers + PEFT VeRA: requests arriving over time, chunked prefill,
preemption, abort, both attention paths; every test ends with the block pool full again."""

import pytest
import torch

from engine_helpers import assert_idle, build, load, random_prompts, reference_greedy
from uora_rt import Engine, SamplingParams


def run_trace(engine, arrivals):
    """arrivals: {step: [(prompt, adapter, max_tokens), ...]}: requests join while others run.
    Returns {request index: final output} and how many steps saw decodes and prefills mixed."""
    order, done, step, mixed = [], {}, 0, 0
    while step <= max(arrivals) or engine.has_unfinished():
        for prompt, name, n in arrivals.get(step, []):
            order.append(engine.add_request(prompt, name, SamplingParams(max_tokens=n)))
        before = engine.stats["prefill_tokens"], engine.stats["decode_tokens"]
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        after = engine.stats["prefill_tokens"], engine.stats["decode_tokens"]
        mixed += after[0] > before[0] and after[1] > before[1]
        step += 1
    return [done[r] for r in order], mixed


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("attention", ["cpp", "torch"])
def test_trace_equals_peft_greedy_per_request(tmp_path, kind, attention):
    fn, base, ads = build(tmp_path, kind)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=2048, max_step_tokens=24, attention=attention)
    prompts = random_prompts(9, seed=1, hi=50)
    names = ["a0", None, "a1", "a2", "a0", None, "a1", "a2", "a0"]
    lengths = [12, 5, 9, 14, 3, 10, 7, 1, 6]
    arrivals = {}
    for i, (p, n, k) in enumerate(zip(prompts, names, lengths)):
        arrivals.setdefault([0, 0, 1, 3, 3, 4, 8, 9, 15][i], []).append((p, n, k))
    outs, mixed = run_trace(engine, arrivals)
    assert mixed > 0  # prompts were prefilled while other requests decoded
    for p, n, k, out in zip(prompts, names, lengths, outs):
        tokens, reason = reference_greedy(fn, ads.get(n), p, k, with_reason=True)
        assert out.token_ids == tokens, (n, len(p))
        assert (out.finish_reason, out.adapter, out.prompt_tokens) == (reason, n, len(p))
    assert_idle(engine)


def test_kv_budget_too_small_preempts_and_finishes_identically(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    prompts = random_prompts(8, seed=2, lo=20, hi=40)
    names = ["a0", "a1", None, "a2"] * 2
    big = Engine(rt, kv_cache_tokens=4096)
    rids = [big.add_request(p, n, SamplingParams(max_tokens=20)) for p, n in zip(prompts, names)]
    done = big.run_until_done()
    want = [done[r].token_ids for r in rids]
    # 8 requests of up to 60 tokens each in 128 tokens of KV: at most two fit at once.
    small = Engine(rt, kv_cache_tokens=128, block_size=8, max_step_tokens=64)
    rids = [small.add_request(p, n, SamplingParams(max_tokens=20)) for p, n in zip(prompts, names)]
    got = small.run_until_done()
    assert small.scheduler.preemptions > 0
    assert [got[r].token_ids for r in rids] == want
    assert small.stats["peak_blocks"] <= small.allocator.capacity
    assert_idle(small)
    assert_idle(big)
    # and one request alone reproduces its tokens (each equals transformers + PEFT too)
    assert want[1] == reference_greedy(fn, ads["a1"], prompts[1], 20)


def test_long_prompt_is_chunked_without_stalling_decodes(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=1024, max_step_tokens=16)
    short = engine.add_request([5, 6, 7], "a0", SamplingParams(max_tokens=30))
    engine.step()  # the short request is decoding
    long_prompt = random_prompts(1, seed=3, lo=150, hi=150)[0]
    long = engine.add_request(long_prompt, "a1", SamplingParams(max_tokens=4))
    advanced = steps = 0
    while True:  # until the long prompt is prefilled (its first token comes out)
        outs = {o.request_id: o for o in engine.step()}
        steps += 1
        advanced += short in outs
        if long in outs:
            break
    # 15 prompt tokens per step beside the short request's decode: ~10 steps, each advancing it
    # (with async scheduling a step's outputs come out of the next call: one call more)
    assert steps == 10 + engine.async_scheduling and advanced == steps
    done = engine.run_until_done()
    assert done[long].token_ids == reference_greedy(fn, ads["a1"], long_prompt, 4)
    assert done[short].token_ids == reference_greedy(fn, ads["a0"], [5, 6, 7], 30)
    assert_idle(engine)


def test_abort_waiting_and_running(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    engine = Engine(rt, kv_cache_tokens=512, max_num_seqs=2)
    a = engine.add_request([1, 2, 3], "a0", SamplingParams(max_tokens=50))
    b = engine.add_request([4, 5], None, SamplingParams(max_tokens=50))
    c = engine.add_request([6], "a1", SamplingParams(max_tokens=5))  # waits: max_num_seqs = 2
    for _ in range(3):
        engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    assert engine.abort(a) and engine.abort(c)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[a].finished and outs[a].finish_reason == "abort" and len(outs[a].token_ids) == 3
    assert outs[c].finished and outs[c].finish_reason == "abort" and outs[c].token_ids == []
    assert not engine.abort(a)  # already gone
    done = engine.run_until_done()
    assert done[b].token_ids == reference_greedy(fn, None, [4, 5], 50)
    assert_idle(engine)


def test_eos_and_stop_tokens_end_requests(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    free = reference_greedy(fn, ads["a1"], [9, 8, 7], 12)
    rt.config["eos_token_id"] = free[4]
    engine = Engine(rt, kv_cache_tokens=512)
    stopped = engine.add_request([9, 8, 7], "a1", SamplingParams(max_tokens=12))
    ignored = engine.add_request([9, 8, 7], "a1", SamplingParams(max_tokens=12, ignore_eos=True))
    done = engine.run_until_done()
    cut = free.index(free[4])
    assert done[stopped].token_ids == free[:cut] and done[stopped].finish_reason == "stop"
    assert done[ignored].token_ids == free and done[ignored].finish_reason == "length"
    assert_idle(engine)


def test_seeded_sampling_is_batch_invariant(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.8, top_k=20, seed=1234)
    alone = Engine(rt, kv_cache_tokens=512)
    rid = alone.add_request([3, 1, 4, 1, 5], "a1", params)
    want = alone.run_until_done()[rid].token_ids
    crowd = Engine(rt, kv_cache_tokens=2048, max_step_tokens=7)
    others = [crowd.add_request(p, n, SamplingParams(max_tokens=9, temperature=t, seed=s))
              for p, n, t, s in zip(random_prompts(5, seed=4), ["a0", None, "a2", "a1", None],
                                    [0.0, 1.3, 0.5, 0.0, 0.7], [1, 2, 3, 4, 5])]
    crowd.step()
    rid2 = crowd.add_request([3, 1, 4, 1, 5], "a1", params)
    got = crowd.run_until_done()
    assert got[rid2].token_ids == want
    assert got[rid2].seed == 1234 and all(got[o].finished for o in others)
    # unseeded requests draw their own seed and report it: replaying it gives the same tokens
    free = Engine(rt, kv_cache_tokens=512)
    r = free.add_request([2, 7], None, SamplingParams(max_tokens=8, temperature=1.0))
    first = free.run_until_done()[r]
    r = free.add_request([2, 7], None, SamplingParams(max_tokens=8, temperature=1.0,
                                                      seed=first.seed))
    assert free.run_until_done()[r].token_ids == first.token_ids


def test_generate_runs_on_the_engine_and_equals_peft(tmp_path):
    fn, base, ads = build(tmp_path, "qwen2")
    rt = load(base, ads)
    prompts = random_prompts(5, seed=5)
    names = ["a2", None, "a0", "a1", "a2"]
    got = rt.generate(prompts, adapters=names, max_new_tokens=11)
    for p, n, g in zip(prompts, names, got):
        tokens, reason = reference_greedy(fn, ads.get(n), p, 11, with_reason=True)
        assert g.tokens == tokens
        assert (g.adapter, g.prompt_tokens, g.finish_reason) == (n, len(p), reason)
    with pytest.raises(ValueError, match="maximum context length is 256 tokens"):
        rt.generate([[1] * 200], max_new_tokens=100)
    assert rt.manager.in_flight == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("attention", [None, "torch"])  # None: Triton where it is installed
def test_gpu_engine_equals_cpu_engine(tmp_path, attention):
    fn, base, ads = build(tmp_path)
    prompts = random_prompts(6, seed=6)
    names = ["a0", "a1", None, "a2", "a0", "a1"]
    tokens = {}
    for device in ("cpu", "cuda"):
        rt = load(base, ads, device=device)
        engine = Engine(rt, kv_cache_tokens=2048, max_step_tokens=32,
                        attention=attention if device == "cuda" else None)
        rids = [engine.add_request(p, n, SamplingParams(max_tokens=12))
                for p, n in zip(prompts, names)]
        done = engine.run_until_done()
        tokens[device] = [done[r].token_ids for r in rids]
        assert_idle(engine)
    assert tokens["cuda"] == tokens["cpu"]


def test_warmup_is_a_no_op_without_cuda_graphs(tmp_path):
    fn, base, ads = build(tmp_path, n_adapters=1)
    engine = Engine(load(base, ads), kv_cache_tokens=512)
    assert engine.runner.graphs is None and engine.warmup() == 0.0
    assert_idle(engine)
