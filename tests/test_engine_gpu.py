"""The engine's CUDA graphs (skipped without a GPU): replayed decode steps give the eager steps'
tokens; new requests, lengths and adapter changes reuse the captured graphs; weights changing
drops them."""

import pytest
import torch

from engine_helpers import BASES, assert_idle, build, load, random_prompts
from peft_ref import make_adapter
from uora_rt import Engine, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
pytest.importorskip("triton", reason="the graph path runs the Triton decode kernel")


def trace(engine, prompts, names, params, stagger=3):
    """Requests join every `stagger` steps, so decode batches change size within buckets."""
    rids, pending, done = [], list(zip(prompts, names)), {}
    while pending or engine.has_unfinished():
        if pending and (engine.stats["steps"] % stagger == 0 or not engine.has_unfinished()):
            p, n = pending.pop(0)
            rids.append(engine.add_request(p, n, params))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return [done[r] for r in rids]


@pytest.mark.parametrize("sampled", [False, True])
def test_graph_steps_equal_eager_steps(tmp_path, sampled):
    fn, base, ads = build(tmp_path)
    prompts = random_prompts(10, seed=11)
    names = ["a0", "a1", None, "a2", "a0", "a1", None, "a2", "a0", None]
    params = SamplingParams(max_tokens=24, temperature=0.8 if sampled else 0.0, top_p=0.9,
                            seed=7)
    got = {}
    for graphs in (False, True):
        rt = load(base, ads, device="cuda")
        engine = Engine(rt, kv_cache_tokens=4096, cuda_graphs=graphs)
        got[graphs] = trace(engine, prompts, names, params)
        assert_idle(engine)
        if graphs:
            assert engine.runner.graphs.captures >= 1
    assert got[True] == got[False]


def test_graph_steps_with_window_fallback_equal_eager_steps(tmp_path, monkeypatch):
    """Sampler windows smaller than the tiny vocabulary: rows whose top-k / top-p prefix does
    not fit are re-drawn by the full sort after the replay (from the graph's logits buffer);
    the tokens equal the eager steps'."""
    from uora_rt.engine import sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "WINDOWS", (8, 16))
    monkeypatch.setattr(sampler_mod, "TOP_P_WINDOW", 8)
    _, base, ads = build(tmp_path)
    prompts = random_prompts(8, seed=16)
    names = ["a0", None, "a1", "a2", None, "a0", "a1", None]
    got = {}
    for params in (SamplingParams(max_tokens=16, temperature=1.0, top_p=0.95, seed=9),
                   SamplingParams(max_tokens=16, temperature=0.9, top_k=40, seed=10)):
        for graphs in (False, True):
            engine = Engine(load(base, ads, device="cuda"), kv_cache_tokens=4096,
                            cuda_graphs=graphs)
            got[graphs] = trace(engine, prompts, names, params)
            assert_idle(engine)
            assert engine.runner.sampler.fallback_rows > 0
            if graphs:  # top-p asks for TOP_P_WINDOW; top-k 40 for 41, so the largest
                window = 8 if params.top_p < 1 else 16
                assert window in {key[3] for key in engine.runner.graphs.graphs}
        assert got[True] == got[False]


def test_graphs_survive_adapter_changes_and_drop_on_merge(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads, device="cuda", slots=4)
    engine = Engine(rt, kv_cache_tokens=4096)
    graphs = engine.runner.graphs
    trace(engine, random_prompts(4, seed=12), ["a0", "a0", "a0", "a0"],
          SamplingParams(max_tokens=8))
    captured = graphs.captures
    # same family, new adapters and slots, other lengths: replays only
    extra = make_adapter(BASES["llama"], tmp_path / "x.uora", lam_seed=99, scale=1.0)
    rt.add_adapter(extra, name="x")
    rt.remove_adapter("a0")
    trace(engine, random_prompts(4, seed=13, hi=60), ["x", "x", "x", "x"],
          SamplingParams(max_tokens=8))
    assert graphs.captures == captured
    rt.merge("x")
    trace(engine, random_prompts(2, seed=14), ["x", "x"], SamplingParams(max_tokens=6))
    assert all(key[2] == () for key in graphs.graphs)  # only graphs built on the merged weights
    rt.unmerge()
    assert_idle(engine)


def test_warmup_captures_every_bucket_so_traffic_never_captures(tmp_path):
    fn, base, ads = build(tmp_path)
    rt = load(base, ads, device="cuda")
    engine = Engine(rt, kv_cache_tokens=4096, max_num_seqs=24)
    assert engine.warmup(adapters=(None, "a0")) > 0
    graphs = engine.runner.graphs
    captured = graphs.captures
    assert captured == 2 * 6  # buckets 1, 2, 4, 8, 16, 24 for each layout
    assert_idle(engine)
    names = [None, "a0", "a0", None, "a0"] * 4  # batches with and without a0's family
    trace(engine, random_prompts(20, seed=15), names, SamplingParams(max_tokens=10), stagger=1)
    assert graphs.captures == captured
    assert_idle(engine)


def test_openai_fields_on_graph_steps_equal_eager_and_the_cpu(tmp_path):
    """Penalties, logit_bias, min_tokens, logprobs and n forks on CUDA: graph steps (ending at
    the logits) give the eager steps' tokens and logprobs, and the CPU engine's."""
    _, base, ads = build(tmp_path)
    prompts = random_prompts(6, seed=12)
    names = ["a0", None, "a1", "a2", "a0", None]
    variants = [dict(), dict(repetition_penalty=1.4, logprobs=3),
                dict(frequency_penalty=0.8, presence_penalty=0.4, logit_bias={5: 3.0}),
                dict(min_tokens=10, logit_bias={2: 20.0}, stop_token_ids=[9]),
                dict(n=3, temperature=0.9, seed=4, logprobs=0, prompt_logprobs=2),
                dict(logprobs=5, prompt_logprobs=0)]
    runs = {}
    for device, graphs in (("cpu", False), ("cuda", False), ("cuda", True)):
        rt = load(base, ads, device=device)
        engine = Engine(rt, kv_cache_tokens=4096, cuda_graphs=graphs if device == "cuda" else None)
        seen = []
        for p, n, kw in zip(prompts, names, variants):
            engine.add_request(p, n, SamplingParams(max_tokens=16, **kw), on_output=seen.append)
        engine.run_until_done()
        finals = sorted(((o.request_id, o.index), o) for o in seen if o.finished)
        runs[device, graphs] = [o for _, o in finals]
        assert engine.stats["forks"] == 2
        if graphs:
            assert engine.runner.graphs.captures > 0
        assert_idle(engine)
    want = runs["cpu", False]
    for key in (("cuda", False), ("cuda", True)):
        got = runs[key]
        assert [o.token_ids for o in got] == [o.token_ids for o in want], key
        for a, b in zip(got, want):
            assert (a.logprobs is None) == (b.logprobs is None)
            for x, y in zip(a.logprobs or [], b.logprobs or []):
                assert abs(x.logprob - y.logprob) < 1e-3 and x.token_id == y.token_id
            if b.prompt_logprobs is not None:
                assert len(a.prompt_logprobs) == len(b.prompt_logprobs)
