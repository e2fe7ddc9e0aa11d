"""The device path's top-k window and its exact fallback, on CPU tensors (CUDA where present):
which rows the window hands to the full sort (top-p prefixes past the window, top-k larger than
it, draws on a tie cut by its edge) and which it keeps (masked or underflowing tails); tokens
equal to the full sort's and the float64 reference's; the distribution over many seeds against
the exact one; the window chosen from the parameters; no sort of the vocabulary; the engine's
runner re-drawing flagged rows."""

import math

import numpy as np
import pytest
import torch
from conftest import requires_cuda
from test_sampler import assert_tokens, chi2_critical, reference, sweep, tensors
from uora_rt.engine import sampler as sampler_mod
from uora_rt.engine import sampler_ops
from uora_rt.engine.sampler import REDO, WINDOWS, Sampler
from uora_rt.kernels import reference as ref

DEVICE, FULL = Sampler("cpu", path="device"), Sampler("cpu", path="full_sort")


def tie_at_edge(rows: int, v: int, gen) -> torch.Tensor:
    """800 distinct leaders, then 400 tokens tied at 0.1 (ids scattered), the rest far below: a
    window of 1024 holds the leaders and 224 of the tied tokens, which may be others than the
    224 lowest ids."""
    x = -6 - torch.rand(rows, v, generator=gen)
    for r in range(rows):
        ids = torch.randperm(v, generator=gen)
        x[r, ids[:800]] = 0.2 + 0.3 * torch.rand(800, generator=gen)
        x[r, ids[800:1200]] = 0.1
    return x


# (1) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "ties", "masked", "zeros"])
@pytest.mark.parametrize("v", [1000, 20011])
def test_window_tokens_equal_full_sort(v, kind):
    """Row by row the device path gives the full sort's token (both on CPU tensors), on the
    sweep of test_sampler; V 20011 puts the window inside the row, so some rows fall back."""
    rows, logits, want, ambiguous = sweep(v, kind)
    st = tensors(rows)
    drawn = DEVICE.draw(logits, st)
    got = DEVICE.finish(logits, drawn, st)
    full = FULL(logits, st)
    same = [g == f or a for g, f, a in zip(got.tolist(), full.tolist(), ambiguous)]
    assert all(same), [i for i, s in enumerate(same) if not s][:10]
    assert_tokens(got, want, ambiguous, f"device, V={v}, {kind}")
    redo = int((drawn == REDO).sum())
    if v > max(WINDOWS):  # top_k V - 1 and V + 5 rows cannot fit; the most common ones do
        assert 0 < redo < len(rows) // 2, redo


def test_which_rows_fall_back():
    gen = torch.Generator().manual_seed(21)
    v = 20011
    peaked = torch.randn(v, generator=gen) * 4
    flat = torch.randn(v, generator=gen) * 0.01
    masked = torch.full((v,), -math.inf)
    masked[torch.randperm(v, generator=gen)[:300]] = torch.randn(300, generator=gen)
    under = peaked.clone()  # finite tail whose exp2 underflows to exactly 0 at T 0.5
    under[torch.randperm(v, generator=gen)[:v - 300]] = -1e4
    cases = [  # (logits row, (T, top_k, top_p), falls back)
        (peaked, (1.0, 0, 0.9), False),
        (peaked, (0.7, 50, 1.0), False),
        (peaked, (1.0, 40, 0.95), False),
        (flat, (1.0, 0, 0.99), True),        # the top-p prefix holds ~99 % of V
        (flat, (1.0, 0, 0.5), True),
        (peaked, (1.0, 5000, 1.0), True),    # top-k larger than the largest window
        (peaked, (1.0, 5000, 0.9), True),    # its normalizer needs all 5000
        (masked, (1.0, 5000, 1.0), False),   # past the 300 live tokens: nothing to count
        (masked, (1.0, 0, 0.999), False),
        (under, (0.5, 5000, 1.0), False),
        (peaked, (0.0, 5000, 0.5), False),   # greedy: never
        (flat, (1.3, 0, 1.0), False),        # temperature only: never
    ]
    logits = torch.stack([c[0] for c in cases])
    params = [(t, k, p, 1000 + i, i) for i, (_, (t, k, p), _) in enumerate(cases)]
    st = tensors(params)
    assert DEVICE.window(st) == WINDOWS[-1]
    drawn = DEVICE.draw(logits, st)
    assert [int(t) == REDO for t in drawn] == [c[2] for c in cases]
    want, ambiguous = reference(logits, params)
    assert_tokens(DEVICE.finish(logits, drawn, st), want, ambiguous, "device + fallback")
    # A smaller window than the parameters ask for: the top-k 50 row still fits, more fall back.
    small = DEVICE.draw(logits, st, window=WINDOWS[0])
    assert int(small[1]) != REDO and int(small[5]) == REDO
    # window 0 (the step announced no top-k / top-p row): every such row falls back.
    none = DEVICE.draw(logits, st, window=0)
    filtered = [t > 0 and (0 < k < v or p < 1) for _, (t, k, p), _ in cases]
    assert [int(t) == REDO for t in none] == filtered
    assert_tokens(DEVICE.finish(logits, none, st), want, ambiguous, "window 0 + fallback")


def test_ties_cut_by_the_window_edge_fall_back_exactly_when_drawn():
    """top-k 1023 over tie_at_edge rows: a draw on the tied tokens needs their lowest ids,
    which the window may not hold, so exactly those rows fall back; others draw in place."""
    gen = torch.Generator().manual_seed(22)
    n, v = 160, 20011
    logits = tie_at_edge(n, v, gen)
    rows = [(1.0, 1023, [1.0, 0.97][i % 2], 5000 + i, 7 * i) for i in range(n)]
    st = tensors(rows)
    assert DEVICE.window(st) == 1024
    drawn = DEVICE.draw(logits, st)
    want, ambiguous = reference(logits, rows)
    on_tie = [bool(logits[i, w] == 0.1) for i, w in enumerate(want)]  # 0.1 as float32
    redo = [int(t) == REDO for t in drawn]
    assert all(r == t or a for r, t, a in zip(redo, on_tie, ambiguous))
    assert 10 <= sum(redo) <= n // 2, sum(redo)
    assert_tokens(DEVICE.finish(logits, drawn, st), want, ambiguous, "ties at the edge")


def test_any_choice_among_ties_by_topk_gives_the_same_tokens(monkeypatch):
    """torch.topk may return any of the tokens tied at the window's smallest value, in any
    order (on CUDA it does): with a topk that takes the highest ids among ties and shuffles
    its output, the tokens stay exact."""
    gen = torch.Generator().manual_seed(26)
    topk = torch.Tensor.topk

    def adversarial(x, k, dim=-1, largest=True, sorted=True):
        v = x.shape[-1]
        ids = torch.arange(v).expand_as(x)
        keys = sampler_ops.order_keys(x.contiguous(), (v - 1) - ids, v)  # ties: highest id first
        idx = topk(keys, k, dim=-1).indices
        idx = idx.gather(1, torch.rand(idx.shape, generator=gen).argsort(-1))
        return torch.return_types.topk((x.gather(1, idx), idx))

    monkeypatch.setattr(torch.Tensor, "topk", adversarial)
    n, v = 120, 20011
    logits = tie_at_edge(n, v, gen)
    rows = [(1.0, 1023, [1.0, 0.97, 0.5][i % 3], 7000 + i, i) for i in range(n)]
    want, ambiguous = reference(logits, rows)
    assert_tokens(DEVICE(logits, tensors(rows)), want, ambiguous, "adversarial topk")
    rows, logits, want, ambiguous = sweep(v, "ties")
    assert_tokens(DEVICE(logits, tensors(rows)), want, ambiguous, "adversarial topk, sweep")


# (2) -------------------------------------------------------------------------------------


def _flat(gen, v):
    return torch.randn(v, generator=gen) * 0.1


def _peaked(gen, v):
    return torch.randn(v, generator=gen) * 3


def _masked(gen, v):
    x = torch.full((v,), -math.inf)
    x[torch.randperm(v, generator=gen)[:600]] = torch.randn(600, generator=gen)
    return x


# name -> (row maker, (T, top_k, top_p), share of draws the full sort makes: (lo, hi))
FIT_CASES = {
    "top-p fits the window": (_peaked, (0.7, 0, 0.9), (0.0, 0.0)),
    "tie cut by the window": (lambda g, v: tie_at_edge(1, v, g)[0], (1.0, 1023, 1.0), (0.1, 0.3)),
    "top-k past the window, masked tail": (_masked, (1.0, 4500, 1.0), (0.0, 0.0)),
    "top-p prefix past the window": (_flat, (1.0, 0, 0.95), (1.0, 1.0)),
}


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_goodness_of_fit_over_seeds(case):
    """Tokens drawn over 12,000 seeds against the exact (float64) candidate distribution, in at
    most 12 bins of consecutive candidates split at its quantiles: chi-square at alpha 0.001
    (so a correct sampler fails a case with probability 0.001; the seeds are fixed, so a pass
    is reproducible). Draws that the window makes and those the full sort re-makes are counted
    together: any bias between the two would show."""
    make, (t, k, p), (lo, hi) = FIT_CASES[case]
    v, n, chunk = 5003, 12000, 1500
    gen = torch.Generator().manual_seed(23)
    row = make(gen, v)
    ids, q, _ = ref.sample_candidates(row, t, k, p)
    got, redo = [], 0
    for c in range(0, n, chunk):
        params = [(t, k, p, 10**12 + 7919 * i, 3) for i in range(c, c + chunk)]
        st = tensors(params)
        x = row.expand(chunk, -1).contiguous()
        drawn = DEVICE.draw(x, st)
        redo += int((drawn == REDO).sum())
        got.append(DEVICE.finish(x, drawn, st))
    got = torch.cat(got)
    assert lo <= redo / n <= hi, redo / n
    candidates = torch.zeros(v, dtype=torch.bool)
    candidates[ids] = True
    assert bool(candidates[got].all()), "drew a token outside the candidates"
    start = np.concatenate([[0.0], np.cumsum(q)[:-1]])  # each candidate's CDF start
    bins = np.minimum((start * 12).astype(int), 11)
    labels = np.unique(bins, return_inverse=True)[1]
    bin_of = torch.full((v,), -1, dtype=torch.long)
    bin_of[ids] = torch.from_numpy(labels)
    observed = torch.bincount(bin_of[got], minlength=labels.max() + 1).double()
    expected = torch.from_numpy(np.bincount(labels, weights=np.asarray(q))) * n
    assert float(expected.min()) >= 5, "test too small for chi-square"
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    df = len(expected) - 1
    if df == 0:  # one bin: every draw is a candidate, checked above
        return
    assert chi2 < chi2_critical(df), (chi2, df, observed, expected)


# (3) -------------------------------------------------------------------------------------


@pytest.mark.parametrize("params,want", [
    ([(0.0, 50, 0.9)], 0),                      # greedy only
    ([(0.8, 0, 1.0), (0.0, 0, 1.0)], 0),        # temperature only: no window at all
    ([(0.8, 50, 1.0)], 1024),
    ([(0.8, 0, 0.9), (0.8, 0, 1.0)], 1024),
    ([(0.8, 1023, 1.0)], 1024),
    ([(0.8, 1024, 1.0)], 4096),                 # k + 1 candidates wanted
    ([(0.8, 40, 0.9), (0.8, 3000, 1.0)], 4096),
    ([(0.8, 100000, 1.0)], 4096),               # the largest; those rows fall back
])
def test_window_from_parameters(params, want):
    rows = [(t, k, p, 1, 0) for t, k, p in params]
    st = tensors(rows)
    assert DEVICE.window(st) == want
    assert DEVICE.window(st, any_sampled=False) == 0
    assert Sampler("cpu").window(st) == 0 and FULL.window(st) == 0
    st.window_need = None  # built without from_lists: the top-p default, the fallback covers
    assert DEVICE.window(st) == sampler_mod.TOP_P_WINDOW


def test_device_path_never_sorts_the_vocabulary(monkeypatch):
    gen = torch.Generator().manual_seed(24)
    v = 20011
    logits = torch.randn(12, v, generator=gen) * 4
    rows = [(1.0, [0, 50, 40, 1000][i % 4], [0.9, 1.0, 0.95, 0.8][i % 4], i, i) for i in
            range(12)]
    want, ambiguous = reference(logits, rows)
    sort, argsort = torch.sort, torch.argsort

    def short_sort(orig):
        def run(x, *a, **k):
            assert x.shape[-1] <= max(WINDOWS), f"sorted {tuple(x.shape)}"
            return orig(x, *a, **k)
        return run

    for name, orig in (("sort", sort), ("argsort", argsort)):
        monkeypatch.setattr(torch, name, short_sort(orig))
        monkeypatch.setattr(torch.Tensor, name, short_sort(orig))
    st = tensors(rows)
    drawn = DEVICE.draw(logits, st)
    assert not bool((drawn == REDO).any())
    assert_tokens(DEVICE.finish(logits, drawn, st), want, ambiguous, "device")


def test_rejects_unknown_path():
    with pytest.raises(ValueError, match=r"path must be one of \('cpu', 'device', "
                                         r"'full_sort'\), got 'sorted'"):
        Sampler("cpu", path="sorted")


# (4) -------------------------------------------------------------------------------------


def test_runner_redraws_flagged_rows(tmp_path, monkeypatch):
    """The engine's runner with the device path (on the CPU) and windows so small that the tiny
    model's rows overflow them: it re-draws those rows with the full sort, so the tokens equal
    those of the CPU path for the same seeds."""
    from engine_helpers import assert_idle, build, load, random_prompts
    from uora_rt import Engine, SamplingParams

    monkeypatch.setattr(sampler_mod, "WINDOWS", (8, 16))
    monkeypatch.setattr(sampler_mod, "TOP_P_WINDOW", 8)
    _, base, ads = build(tmp_path)
    prompts = random_prompts(6, seed=31)
    params = [SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=1),
              SamplingParams(max_tokens=6, temperature=0.8, top_k=12, seed=2),
              SamplingParams(max_tokens=6, temperature=1.0, top_k=40, seed=3),
              SamplingParams(max_tokens=6, temperature=0.7, seed=4),
              SamplingParams(max_tokens=6, seed=5),
              SamplingParams(max_tokens=6, temperature=1.2, top_k=5, top_p=0.8, seed=6)]
    got = {}
    for path in ("cpu", "device"):
        engine = Engine(load(base, ads), kv_cache_tokens=2048)
        engine.runner.sampler = Sampler("cpu", path=path)
        rids = [engine.add_request(p, None, sp) for p, sp in zip(prompts, params)]
        done = engine.run_until_done()
        got[path] = [done[r].token_ids for r in rids]
        assert_idle(engine)
        if path == "device":
            assert engine.runner.sampler.fallback_rows > 0
    assert got["device"] == got["cpu"]


@requires_cuda
def test_cuda_graph_with_fallback():
    """The window captured in a CUDA graph, flagged rows re-drawn after the replay: the same
    tokens as eager and as the CPU full sort (but for float32 boundary cases)."""
    gen = torch.Generator().manual_seed(25)
    v = 20011
    n = 96
    logits = tie_at_edge(n, v, gen)
    logits[::3] = torch.randn(n // 3, v, generator=gen) * 0.01  # flat rows
    rows = [(1.0, [1023, 0, 50][i % 3], [1.0, 0.99, 0.9][i % 3], 300 + i, i) for i in range(n)]
    want = FULL(logits, tensors(rows))
    _, ambiguous = reference(logits, rows)
    x, st, sampler = logits.cuda(), tensors(rows, "cuda"), Sampler("cuda")
    eager = sampler(x, st)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        sampler.draw(x, st)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        drawn = sampler.draw(x, st)
    graph.replay()
    assert bool((drawn == REDO).any())
    got = sampler.finish(x, drawn, st)
    assert torch.equal(got, eager.cpu())
    assert all(g == w or a for g, w, a in zip(got.tolist(), want.tolist(), ambiguous))
