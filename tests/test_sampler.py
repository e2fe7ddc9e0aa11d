"""The engine's sampler against reference.sample_row: the seeded uniform's bits, tokens row by row
over temperature / top-k / top-p / greedy mixes (with ties and masked logits), batch invariance,
goodness of fit, CUDA, bad input, on each path (CPU windows, the device path's top-k window with
its fallback, the full sort), all runnable on CPU tensors; test_sampler_window.py has more."""

import math

import pytest
import torch
from conftest import CDF_MARGIN, requires_cuda
from uora_rt.kernels import reference as ref
from uora_rt.engine import sampler_cpu
from uora_rt.engine.sampler import Sampler, SamplingTensors, uniform

# A token may differ from the float64 reference only where float32 arithmetic can flip it: u
# within CDF_MARGIN (conftest) of a CDF boundary, or a top-p cumulative within it of top_p.

TEMPS = (0.0, 0.3, 0.7, 1.0, 1.8)
TOP_KS = (0, 1, 2, 17, -1, -2, -3)   # -1: V - 1, -2: V, -3: V + 5
TOP_PS = (1.0, 0.95, 0.5, 0.1, 1e-6)


def sweep_params(v, gen):
    """One row per (temperature, top_k, top_p), with random 63-bit seeds and positions."""
    rows = []
    for t in TEMPS:
        for k in TOP_KS:
            k = {-1: v - 1, -2: v, -3: v + 5}.get(k, k)
            for p in TOP_PS:
                seed = int(torch.randint(0, 2**62, (1,), generator=gen)) * 2 + 1
                pos = int(torch.randint(0, 2**40, (1,), generator=gen))
                rows.append((t, k, p, seed, pos))
    return rows


def make_logits(kind, b, v, gen):
    x = torch.randn(b, v, generator=gen) * 3
    if kind == "ties":  # few distinct values: ties inside windows and at their boundaries
        x = (x * 2).round() / 2
    elif kind == "masked":  # ~40% masked (as constrained decoding does), one live token kept
        x[torch.rand(b, v, generator=gen) < 0.4] = -math.inf
        x[:, 0] = x[:, 0].clamp_min(-1.0)
    elif kind == "zeros":  # -0.0 and +0.0 are one value, ordered by id
        x = torch.where(torch.rand(b, v, generator=gen) < 0.5, -0.0, 0.0) + (x > 4) * x
    return x


def tensors(rows, device="cpu"):
    cols = list(zip(*rows))
    return SamplingTensors.from_lists(*cols, device=device)


def reference(logits, rows):
    """(tokens, ambiguous): the reference token per row and whether float32 may flip it."""
    tokens, ambiguous = [], []
    for x, (t, k, p, seed, pos) in zip(logits, rows):
        tokens.append(ref.sample_row(x, t, k, p, seed, pos))
        if t == 0:
            ambiguous.append(False)
            continue
        _, q, cum_k = ref.sample_candidates(x, t, k, p)
        u = ref.sample_uniform(seed, pos)
        near = _min_dist(q, u) < CDF_MARGIN
        if cum_k is not None:
            near |= min(abs(c - p) for c in cum_k) < CDF_MARGIN
        ambiguous.append(bool(near))
    return tokens, ambiguous


def _min_dist(q, u):
    acc, best = 0.0, abs(u)
    for p in q:
        acc += p
        best = min(best, abs(acc - u))
    return best


def assert_tokens(got, want, ambiguous, what):
    got = got.tolist()
    bad = [i for i, (g, w, a) in enumerate(zip(got, want, ambiguous)) if g != w and not a]
    assert not bad, f"{what}: rows {bad[:10]} got {[got[i] for i in bad[:10]]}, want " \
                    f"{[want[i] for i in bad[:10]]}"
    assert sum(ambiguous) <= max(2, len(ambiguous) // 50), f"{what}: too many boundary rows"


# Chi-square tests at alpha = 0.001 (the seeds are fixed, so a pass is reproducible). Critical
# values come from scipy where it is installed, else from this standard table (degrees of
# freedom -> chi2 quantile 0.999), which test_chi2_table_matches_scipy checks against scipy.
CHI2_ALPHA = 0.001
CHI2_CRIT_001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
                 8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264, 63: 103.442}


def chi2_critical(df):
    try:
        from scipy.stats import chi2
    except ImportError:
        return CHI2_CRIT_001[df]
    return float(chi2.ppf(1 - CHI2_ALPHA, df))


SAMPLERS = {"cpu": Sampler("cpu"), "device": Sampler("cpu", path="device"),
            "full_sort": Sampler("cpu", path="full_sort")}


# (1) --------------------------------------------------------------------------------------


def test_uniform_bits_equal_reference():
    gen = torch.Generator().manual_seed(1)
    seeds = [0, 1, 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**62, 2**63 - 1]
    seeds += torch.randint(0, 2**63 - 1, (40,), generator=gen).tolist()
    positions = [0, 1, 2, 3, 1000, 2**31, 2**32 - 1, 2**32, 2**40 + 3, 2**63 - 1]
    positions += torch.randint(0, 2**63 - 1, (20,), generator=gen).tolist()
    s = torch.tensor([a for a in seeds for _ in positions])
    p = torch.tensor([b for _ in seeds for b in positions])
    want = torch.tensor([ref.sample_uniform(a, b) for a, b in zip(s.tolist(), p.tolist())],
                        dtype=torch.float64)
    got = uniform(s, p)
    assert got.dtype == torch.float32
    assert torch.equal(got.double(), want)  # exact: multiples of 2**-24
    assert float(got.min()) >= 0 and float(got.max()) < 1


def test_uniform_is_uniform_and_seeds_differ():
    n = 1 << 16
    pos = torch.arange(n)
    u = uniform(torch.full((n,), 12345), pos)
    counts = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((counts - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < chi2_critical(63), chi2
    v = uniform(torch.full((n,), 12346), pos)  # neighbouring seed: uncorrelated stream
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 0.02
    assert float((u[1:] == u[:-1]).float().mean()) < 1e-3


# (2) (5) ----------------------------------------------------------------------------------


_SWEEPS = {}


def sweep(v, kind):
    """(rows, logits, reference tokens, ambiguous), computed once per (V, kind)."""
    if (v, kind) not in _SWEEPS:
        gen = torch.Generator().manual_seed(v)
        rows = sweep_params(v, gen)
        logits = make_logits(kind, len(rows), v, gen)
        _SWEEPS[v, kind] = (rows, logits, *reference(logits, rows))
    return _SWEEPS[v, kind]


# V = 20011 (prime): windows go in two levels over blocks, with a short last block.
@pytest.mark.parametrize("kind", ["random", "ties", "masked", "zeros"])
@pytest.mark.parametrize("v", [7, 111, 1000, 20011])
@pytest.mark.parametrize("path", list(SAMPLERS))
def test_tokens_equal_reference(path, v, kind):
    rows, logits, want, ambiguous = sweep(v, kind)
    got = SAMPLERS[path](logits, tensors(rows))
    assert got.dtype == torch.int64 and got.shape == (len(rows),)
    assert_tokens(got, want, ambiguous, f"{path}, V={v}, {kind}")


def test_top_p_window_grows():
    """Flat logits: top-p 0.9 needs ~85% of 6000 tokens, so the CPU window grows 64 -> 6000."""
    gen = torch.Generator().manual_seed(3)
    v = 6000
    rows = [(1.0, 0, p, 7 + i, i) for i, p in enumerate([0.9, 0.5, 0.99, 0.2, 0.9999])]
    rows += [(1.0, 3000, 0.9, 99, 5), (0.5, 0, 1.0, 5, 5)]
    logits = torch.randn(len(rows), v, generator=gen) * 0.3
    want, ambiguous = reference(logits, rows)
    for path, sampler in SAMPLERS.items():
        assert_tokens(sampler(logits, tensors(rows)), want, ambiguous, path)


def test_tied_block_maxima_at_the_window_edge():
    """Many blocks share the max that the window's edge falls on: the window must still take the
    lowest ids among the tied tokens, whichever tied blocks topk happens to return; and leaders
    among the V % g tokens past the last block (V = 20011) are found, tied or not."""
    gen = torch.Generator().manual_seed(10)
    v, rows = 20011, []
    logits = -5 - 5 * torch.rand(24, v, generator=gen)
    for r in range(logits.shape[0]):
        ids = torch.randperm(v, generator=gen)
        logits[r, ids[:10]] = 3.05 + 0.05 * torch.arange(10.0)  # ten distinct leaders
        logits[r, ids[10:10 + 40 + r]] = 3.0  # then a tie spread over dozens of blocks
        rows.append((1.0, [17, 30, 64][r % 3], [1.0, 0.9999][r % 2], 100 + r, r))
    logits[::4, -12:] = 4.0 + torch.rand(12, generator=gen)  # leaders past the last block
    untied = -5 - 5 * torch.rand(8, v, generator=gen)  # no ties: no exact redo either
    untied[::2, -12:] = 4.0 + torch.rand(12, generator=gen)
    for x in (logits, untied):  # the window itself, not only the tokens drawn from it
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        for w in (17, 30, 64, 257):
            got = sampler_cpu._window(x, w, sampler_cpu.Workspace())[1]
            assert torch.equal(got, order[:, :w]), w
    want, ambiguous = reference(logits, rows)
    for path, sampler in SAMPLERS.items():
        assert_tokens(sampler(logits, tensors(rows)), want, ambiguous, path)


def test_cpu_never_sorts_the_vocabulary(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    rows = sweep_params(500, gen)
    logits = make_logits("ties", len(rows), 500, gen)
    want, ambiguous = reference(logits, rows)

    def no_sort(*a, **k):
        raise AssertionError("torch.sort called on the CPU path")

    monkeypatch.setattr(torch, "sort", no_sort)
    monkeypatch.setattr(torch.Tensor, "sort", no_sort)
    assert_tokens(Sampler("cpu")(logits, tensors(rows)), want, ambiguous, "cpu")


def test_greedy_rows_are_argmax():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 50, generator=gen)
    logits[1, [3, 9, 40]] = 10.0  # ties: the lowest id wins
    logits[4, :] = 2.0
    rows = [(0.0, 0, 1.0, 1, 0), (0.0, 5, 0.5, 2, 3), (1.0, 0, 1.0, 3, 0), (0.0, 0, 1.0, 4, 9),
            (0.0, 1, 1.0, 5, 0), (0.7, 10, 0.9, 6, 1)]
    for sampler in SAMPLERS.values():
        got = sampler(logits, tensors(rows))
        for i in (0, 1, 3, 4):
            assert int(got[i]) == int(logits[i].argmax())
        assert int(got[1]) == 3 and int(got[4]) == 0
        greedy = [(0.0, k, p, s, q) for _, k, p, s, q in rows]
        assert torch.equal(sampler(logits, tensors(greedy), any_sampled=False),
                           logits.argmax(-1))
        assert torch.equal(sampler(logits, tensors(greedy)), logits.argmax(-1))


def test_hints_only_skip_work():
    gen = torch.Generator().manual_seed(6)
    rows = [r for r in sweep_params(300, gen) if r[2] == 1.0]  # no top-p row
    logits = torch.randn(len(rows), 300, generator=gen) * 2
    for sampler in SAMPLERS.values():
        st = tensors(rows)
        assert torch.equal(sampler(logits, st), sampler(logits, st, any_top_p=False))


# (3) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(SAMPLERS))
def test_batch_invariance(path):
    """A row's token alone == inside a batch of other rows/parameters == at another position."""
    sampler = SAMPLERS[path]
    gen = torch.Generator().manual_seed(7)
    v = 400
    rows = sweep_params(v, gen)
    logits = make_logits("ties", len(rows), v, gen)
    _, ambiguous = reference(logits, rows)
    batch = sampler(logits, tensors(rows))
    perm = torch.randperm(len(rows), generator=gen)
    shuffled = sampler(logits[perm], tensors([rows[i] for i in perm.tolist()]))
    assert torch.equal(shuffled, batch[perm])
    half = list(range(0, len(rows), 2))  # a smaller batch with a different mix of rows
    part = sampler(logits[half], tensors([rows[i] for i in half]))
    assert torch.equal(part, batch[half])
    for i in range(0, len(rows), 3):
        alone = int(sampler(logits[i:i + 1], tensors([rows[i]]))[0])
        assert alone == int(batch[i]) or ambiguous[i], (i, rows[i])


# (4) --------------------------------------------------------------------------------------

def test_chi2_table_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df, crit in CHI2_CRIT_001.items():
        assert abs(stats.chi2.ppf(1 - CHI2_ALPHA, df) - crit) < 2e-3, df


FIT_CASES = {"temperature": (0.8, 0, 1.0), "top_k": (1.0, 5, 1.0), "top_p": (1.0, 0, 0.8),
             "top_k + top_p": (1.3, 6, 0.7)}


@pytest.mark.parametrize("vary", ["position", "seed"])
@pytest.mark.parametrize("case", list(FIT_CASES))
@pytest.mark.parametrize("path", list(SAMPLERS))
def test_goodness_of_fit(path, case, vary):
    t, k, p = FIT_CASES[case]
    logits_row = torch.tensor([2.0, 1.5, 1.4, 0.9, 0.3, 0.0, -0.2, -0.5, -1.0, 0.7, 1.1, -2.0])
    n = 20000
    rows = [(t, k, p, 2024 if vary == "position" else 10**12 + 977 * i,
             i if vary == "position" else 5) for i in range(n)]
    got = SAMPLERS[path](logits_row.expand(n, -1).contiguous(), tensors(rows))
    counts = torch.bincount(got, minlength=12).double()
    ids, q, _ = ref.sample_candidates(logits_row, t, k, p)
    outside = [i for i in range(12) if i not in ids]
    assert float(counts[outside].sum()) == 0, f"drew non-candidates {outside}"
    expected = torch.tensor(q, dtype=torch.float64) * n
    assert float(expected.min()) >= 5, "test too small for chi-square"
    observed = counts[ids]
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < chi2_critical(len(ids) - 1), (chi2, len(ids) - 1, observed, expected)


# (6) --------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("v", [1000, 49152])
def test_cuda_same_tokens_as_cpu(v):
    gen = torch.Generator().manual_seed(8)
    rows = sweep_params(v, gen)
    logits = make_logits("ties" if v == 1000 else "random", len(rows), v, gen)
    want, ambiguous = reference(logits, rows) if v == 1000 else (None, None)
    cpu = Sampler("cpu")(logits, tensors(rows))
    cuda = Sampler("cuda")(logits.cuda(), tensors(rows, "cuda"))
    if want is not None:
        assert_tokens(cuda.cpu(), want, ambiguous, "cuda")
    diff = (cpu != cuda.cpu()).nonzero()[:, 0].tolist()
    assert len(diff) <= 2, diff
    if diff:  # only where the reference says float32 may flip the token
        assert all(reference(logits[diff], [rows[i] for i in diff])[1]), diff


@requires_cuda
def test_cuda_graph_replay_is_exact():
    gen = torch.Generator().manual_seed(9)
    rows = sweep_params(2000, gen)
    logits = make_logits("masked", len(rows), 2000, gen).cuda()
    st, sampler = tensors(rows, "cuda"), Sampler("cuda")
    eager = sampler(logits, st)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        sampler.draw(logits, st)  # warm-up off the default stream, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # draw is the sync-free part; finish runs after the replay
        out = sampler.draw(logits, st)
    graph.replay()
    assert torch.equal(sampler.finish(logits, out, st), eager.cpu())


# (7) --------------------------------------------------------------------------------------

GOOD = dict(temperature=[0.0, 0.7], top_k=[0, 5], top_p=[1.0, 0.9], seed=[1, 2],
            position=[0, 3])


@pytest.mark.parametrize("field,value,match", [
    ("temperature", [0.0], r"fields differ in length: .*'temperature': 1"),
    ("temperature", [-0.5, 1.0], r"temperature\[0\] = -0.5: expected >= 0"),
    ("temperature", [1.0, math.nan], r"temperature\[1\] = nan"),
    ("temperature", [1.0, math.inf], r"temperature\[1\] = inf"),
    ("top_p", [0.0, 0.5], r"top_p\[0\] = 0.0: expected in \(0, 1\]"),
    ("top_p", [1.5, 0.5], r"top_p\[0\] = 1.5"),
    ("top_p", [0.5, math.nan], r"top_p\[1\] = nan"),
    ("top_k", [-1, 0], r"top_k\[0\] = -1: expected an integer >= 0"),
    ("top_k", [2.5, 0], r"top_k\[0\] = 2.5"),
    ("top_k", [True, 0], r"top_k\[0\] = True"),
    ("seed", [-1, 0], r"seed\[0\] = -1: expected an integer in \[0, 2\*\*63\)"),
    ("seed", [2**63, 0], r"seed\[0\] = 9223372036854775808"),
    ("position", [0, -2], r"position\[1\] = -2"),
])
def test_from_lists_rejects(field, value, match):
    with pytest.raises(ValueError, match=match):
        SamplingTensors.from_lists(**{**GOOD, field: value}, device="cpu")


def test_from_lists_round_trip():
    st = SamplingTensors.from_lists(temperature=[0.0, 0.7], top_k=[0, 5], top_p=[1.0, 0.9],
                                    seed=[2**63 - 1, 0], position=[0, 2**40], device="cpu")
    assert st.temperature.dtype == torch.float32 and st.top_p.dtype == torch.float32
    assert st.temperature.tolist() == [0.0, pytest.approx(0.7)]
    assert st.top_p.tolist() == [1.0, pytest.approx(0.9)]
    assert st.seed.tolist() == [2**63 - 1, 0] and st.position.tolist() == [0, 2**40]
    assert st.top_k.dtype == torch.int64 and st.top_k.tolist() == [0, 5]


def test_sampler_rejects_bad_shapes():
    s, st = Sampler("cpu"), SamplingTensors.from_lists(**GOOD, device="cpu")
    with pytest.raises(ValueError, match=r"logits must be a \[B, V\] tensor with V >= 1, got "
                                         r"\(2,\)"):
        s(torch.zeros(2), st)
    with pytest.raises(ValueError, match=r"logits must be a \[B, V\].*\(2, 0\)"):
        s(torch.zeros(2, 0), st)
    with pytest.raises(ValueError, match=r"temperature must be \[3\] \(one per logits row\), "
                                         r"got \(2,\)"):
        s(torch.zeros(3, 10), st)
    with pytest.raises(ValueError, match=r"logits must be floating point, got torch.int64"):
        s(torch.zeros(2, 10, dtype=torch.int64), st)
    bad = SamplingTensors(st.temperature, st.top_k, st.top_p.double(), st.seed, st.position)
    with pytest.raises(ValueError, match=r"top_p must be torch.float32 on cpu, got torch.float64"):
        s(torch.zeros(2, 10), bad)
    assert s(torch.zeros(0, 10), SamplingTensors.from_lists([], [], [], [], [], "cpu")).shape \
        == (0,)


@requires_cuda
def test_sampler_rejects_wrong_device():
    st = SamplingTensors.from_lists(**GOOD, device="cpu")
    with pytest.raises(ValueError, match=r"temperature must be torch.float32 on cuda:0, got "
                                         r"torch.float32 on cpu"):
        Sampler("cuda")(torch.zeros(2, 10, device="cuda"), st)
    with pytest.raises(ValueError, match=r"logits on cuda:0, sampler on cpu"):
        Sampler("cpu")(torch.zeros(2, 10, device="cuda"), st)
