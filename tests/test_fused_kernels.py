"""The fused decoder kernels of kernels/fused.py against the torch ops they replace, and a whole
model run with them against it without them: on a GPU, or on the CPU in Triton's interpreter
(TRITON_INTERPRET=1, set before this file is imported). Skipped where Triton is not installed."""

import pytest
import torch

from conftest import ELEMENT_TOL, MODEL_TOL, assert_close
# The decode tests' module carries the Triton / device skips and the device and dtype choice.
from test_triton_decode import DEVICE, DTYPES, INTERPRET
from uora_rt.kernels import fused


def randn(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [17, 576, 1000, 4096])
@pytest.mark.parametrize("with_delta,with_extra", [(False, False), (True, False), (True, True)])
def test_add_rms_norm_equals_torch(dtype, n, with_delta, with_extra):
    wide = randn(5, n + 3, dtype=dtype, scale=3.0)
    x = wide[:, :n]                                   # rows with a stride other than n
    delta = randn(5, n, dtype=dtype, seed=1) if with_delta else None
    extra = randn(5, n, dtype=torch.float32, seed=3, scale=0.5) if with_extra else None
    w = randn(n, dtype=dtype, seed=2)
    with torch.no_grad():
        got_x, got_h = fused.triton_add_rms_norm(x, delta, w, 1e-5, extra)
        want_x, want_h = fused.torch_add_rms_norm(x, delta, w, 1e-5, extra)
    assert torch.equal(got_x, want_x)  # the add rounds once, as torch's does
    assert_close(got_h, want_h, table=ELEMENT_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [7, 96, 11008])
@pytest.mark.parametrize("with_extra", [False, True])
def test_silu_mul_equals_torch(dtype, n, with_extra):
    gu = randn(2, 3, 2 * n, dtype=dtype, scale=4.0)
    extra = randn(2, 3, 2 * n, dtype=torch.float32, seed=1) if with_extra else None
    got = fused.triton_silu_mul(gu, extra)
    assert got.shape == (2, 3, n)
    assert_close(got, fused.torch_silu_mul(gu, extra), table=ELEMENT_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv,hd", [(4, 2, 64), (8, 8, 128), (6, 3, 80)])
@pytest.mark.parametrize("with_extra", [False, True])
def test_rope_store_equals_rope_and_index_copy(dtype, n_heads, n_kv, hd, with_extra):
    t, blocks, bs = 9, 6, 4
    qkv = randn(t, (n_heads + 2 * n_kv) * hd, dtype=dtype)
    extra = randn(*qkv.shape, dtype=torch.float32, seed=8) if with_extra else None
    pos = torch.tensor([0, 1, 2, 7, 30, 31, 100, 5, 4096], device=DEVICE)
    inv = 1.0 / (10000.0 ** (torch.arange(0, hd, 2).float() / hd)).to(DEVICE)
    emb = torch.cat([pos.float()[:, None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    slots = torch.randperm(blocks * bs, generator=torch.Generator().manual_seed(3))[:t].to(DEVICE)
    got_k, got_v = (randn(blocks, bs, n_kv, hd, dtype=dtype, seed=s) for s in (4, 5))
    want_k, want_v = got_k.clone(), got_v.clone()
    q = fused.triton_rope_store(qkv, cos, sin, slots, got_k, got_v, n_heads, n_kv, hd, extra)
    qs, ks, vs = fused.with_extra(qkv, extra).split([n_heads * hd, n_kv * hd, n_kv * hd], dim=-1)
    want_q = fused.apply_rope(qs.view(t, n_heads, hd), cos, sin)
    want_k.view(-1, n_kv, hd).index_copy_(0, slots, fused.apply_rope(ks.view(t, n_kv, hd), cos,
                                                                     sin))
    want_v.view(-1, n_kv, hd).index_copy_(0, slots, vs.reshape(t, n_kv, hd))
    assert_close(q, want_q, table=ELEMENT_TOL)
    assert_close(got_k, want_k, table=ELEMENT_TOL)  # untouched slots compare equal too
    assert torch.equal(got_v, want_v)


def test_routes_say_why_not():
    from uora_rt.kernels.routes import KernelPrefs, choose

    f32 = torch.float32
    assert not choose(KernelPrefs(fused=False), DEVICE, f32, f32, 2).fused
    with torch.enable_grad(), pytest.raises(ValueError, match="autograd"):
        choose(KernelPrefs(fused=True), DEVICE, f32, f32, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16 if INTERPRET else torch.bfloat16])
def test_engine_steps_with_fused_kernels_equal_without(tmp_path, monkeypatch, dtype):
    """The engine's model over a paged KV cache (prefill, then decode steps) with adapters of
    two families in the batch: each step's logits with the fused kernels (and, in 16 bits, the
    adapter deltas computed beside the base GEMMs and added by the consumer kernels) against
    the torch ops, for as long as the two runs have drawn the same tokens (16-bit runs may part
    on a near tie)."""
    from engine_helpers import build, load, random_prompts
    from uora_rt import Engine, SamplingParams
    from uora_rt import runtime
    from uora_rt.adapters.batch import AdapterBatch

    if INTERPRET:  # the shared factors in the model's dtype, as on a GPU
        monkeypatch.setattr(runtime, "factor_dtype_for", lambda dev, dt: dt)
    deferred, run_deferred = [], AdapterBatch._deferred

    def spy(self, *args):
        y, extra = run_deferred(self, *args)
        deferred.append(extra is not None)
        return y, extra

    monkeypatch.setattr(AdapterBatch, "_deferred", spy)
    _, base, ads = build(tmp_path)
    runs = {}
    for use in (False, True):
        rt = load(base, ads, device=DEVICE, dtype=dtype, parallel_shrink=True)
        rt.kernel_prefs.fused = use
        engine = Engine(rt, kv_cache_tokens=2048, cuda_graphs=False)
        steps, sampler = [], engine.runner.sampler

        def record(logits, *args, draw=sampler.draw, steps=steps):
            tokens = draw(logits, *args)  # every step's logits pass here (no graphs)
            steps.append((logits.clone(), tokens.clone()))
            return tokens

        monkeypatch.setattr(sampler, "draw", record)
        for prompt, name in zip(random_prompts(6, seed=5), ["a0", None, "a1", "a2", "a0", None]):
            engine.add_request(prompt, name, SamplingParams(max_tokens=8))
        engine.run_until_done()
        runs[use] = steps
    assert any(deferred) == (dtype != torch.float32)  # 16-bit decode steps defer the expand
    compared = 0
    for (want, want_tok), (got, got_tok) in zip(runs[False], runs[True]):
        assert_close(got, want, table=MODEL_TOL, dtype=torch.bfloat16 if dtype != torch.float32
                     else dtype)
        compared += 1
        if not torch.equal(want_tok, got_tok):
            assert dtype != torch.float32, "float32 runs must draw the same tokens"
            break
    assert compared >= 2  # a prefill step and at least one decode step


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_graph_replay_is_bit_exact():
    dt, t, nh, nkv, hd = torch.bfloat16, 24, 8, 2, 64
    x, delta = randn(t, 512, dtype=dt, seed=1), randn(t, 512, dtype=dt, seed=2)
    w, gu = randn(512, dtype=dt, seed=3), randn(t, 2 * 300, dtype=dt, seed=4)
    qkv = randn(t, (nh + 2 * nkv) * hd, dtype=dt, seed=5)
    cos, sin = randn(t, 1, hd, dtype=dt, seed=6), randn(t, 1, hd, dtype=dt, seed=7)
    kc, vc = randn(4, 8, nkv, hd, dtype=dt, seed=8), randn(4, 8, nkv, hd, dtype=dt, seed=9)
    slots = torch.randperm(32, device=DEVICE)[:t]

    def run():
        return (*fused.triton_add_rms_norm(x, delta, w, 1e-6), fused.triton_silu_mul(gu),
                fused.triton_rope_store(qkv, cos, sin, slots, kc, vc, nh, nkv, hd))

    eager = [o.clone() for o in run()] + [kc.clone(), vc.clone()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for cache in (kc, vc):  # the rows the step writes
        cache.view(-1, nkv, hd)[slots] = 0
    graph.replay()
    for got, want in zip(list(outs) + [kc, vc], eager):
        assert torch.equal(got, want)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_deferred_expand_graph_steps_equal_eager_steps(tmp_path):
    """bf16 decode steps with the adapter deltas computed on the side stream: replayed from
    CUDA graphs against eager. Eight requests decode in lockstep (a full bucket, no padding
    rows), so both run the same shapes and must draw the same tokens, bit for bit."""
    from engine_helpers import build, load, random_prompts
    from uora_rt import Engine, SamplingParams

    _, base, ads = build(tmp_path)
    names = ["a0", "a1", None, "a2", "a0", "a1", "a2", None]
    got = {}
    for graphs in (False, True):
        rt = load(base, ads, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():  # as steps run: the fused kernels never serve autograd
            routes = Engine(rt, kv_cache_tokens=64).runner.routes(8)
        assert routes.parallel_shrink and routes.deferred
        engine = Engine(rt, kv_cache_tokens=4096, cuda_graphs=graphs)
        rids = [engine.add_request(p, n, SamplingParams(max_tokens=12, ignore_eos=True))
                for p, n in zip(random_prompts(8, seed=21), names)]
        done = engine.run_until_done()
        got[graphs] = [done[r].token_ids for r in rids]
        if graphs:
            assert engine.runner.graphs.captures >= 1
    assert got[True] == got[False]
