"""The CUDA ops against reference.py: the group/expand sweep (both routes), ranks that break tiling,
long-reduction error against plain torch, reinit and mix_projections, CUDA-graph capture/replay."""

import itertools

import pytest
import torch
from conftest import REINIT_LITERAL_ATOL, assert_close, requires_cuda
from test_group_op import make_case
from uora_rt.kernels import ops, reference
from uora_rt import projections

pytestmark = requires_cuda

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(111, (111, 37)), (2049, (64, 2049)), (11008, (11008,))]  # (in, outs of the group)
SPREADS = ["distinct", "identical", "zipf", "segment", "base_rows"]
SWEEP = list(itertools.product(DTYPES, SHAPES, [1, 3, 7, 64, 133], SPREADS, [False, True]))


def ids(case):
    dtype, (in_f, outs), tokens, kind, with_q = case
    return f"{str(dtype)[6:]}-{in_f}x{'+'.join(map(str, outs))}-T{tokens}-{kind}-q{int(with_q)}"


def want(args):
    return reference.uora_group(*[a.cpu() if torch.is_tensor(a) else a for a in args])


def shrink_into_ext(args, u_dtype):
    """The runtime's layout: one buffer [y | u] from a base GEMM with A_cat's rows appended, so y is
    a strided view and u starts right after y's columns (unaligned for odd widths)."""
    y, x, a_cat = args[:3]
    u = x.float() @ a_cat[:, : x.shape[1]].float().T
    ext = torch.cat([y, u.to(y.dtype)], 1)
    ny = y.shape[1]
    u_view = ext[:, ny:] if u_dtype == y.dtype else u.to(u_dtype)
    return ext, ext[:, :ny], u_view


@pytest.mark.parametrize("case", SWEEP, ids=[ids(c) for c in SWEEP])
def test_group_sweep(case):
    dtype, (in_f, outs), tokens, kind, with_q = case
    args = make_case(in_f, outs, 16, 5, tokens, kind, with_q, dtype, "cuda", seed=tokens)
    expected = want(args)
    ops.uora_group_(*args)
    assert_close(args[0].cpu(), expected)


@pytest.mark.parametrize("case", SWEEP, ids=[ids(c) for c in SWEEP])
def test_expand_sweep(case):
    dtype, (in_f, outs), tokens, kind, with_q = case
    args = make_case(in_f, outs, 16, 5, tokens, kind, with_q, dtype, "cuda", seed=tokens + 1)
    expected = want(args)
    b_cat = args[3] if dtype == torch.float32 else args[3].to(dtype)  # the GPU's layout
    ext, y, u = shrink_into_ext(args, dtype)
    ops.uora_expand_(y, u, b_cat, *args[4:])
    assert_close(y.cpu(), expected)
    assert torch.equal(ext[:, y.shape[1]:].cpu(), shrink_into_ext(args, dtype)[2].cpu())  # u intact


@pytest.mark.parametrize("impl", ["fused", "gemm"])
@pytest.mark.parametrize("r", [5, 12, 64, 256, 1100])
@pytest.mark.parametrize("with_q", [False, True])
@pytest.mark.parametrize("b_dtype", ["f32", "act"])
@pytest.mark.parametrize("u_f32", [False, True])
def test_expand_ranks_routes_and_operand_dtypes(monkeypatch, impl, r, with_q, b_dtype, u_f32):
    """Ranks that are not multiples of the vector widths (5, 12), several K phases (1100 with Q:
    K = 2208 > 2048), float32 or activation-dtype b_cat and u, each route forced."""
    monkeypatch.setenv("UORA_EXPAND_IMPL", impl)
    args = make_case(2049, (2049, 96), r, 7, 24, "base_rows", with_q, torch.bfloat16, "cuda",
                     seed=r)
    expected = want(args)
    b_cat = args[3] if b_dtype == "f32" else args[3].to(torch.bfloat16)
    _, y, u = shrink_into_ext(args, torch.float32 if u_f32 else torch.bfloat16)
    ops.uora_expand_(y, u, b_cat, *args[4:])
    assert_close(y.cpu(), expected)


@pytest.mark.parametrize("impl", ["fused", "gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_base_only_rows_untouched_and_no_nan_leak(monkeypatch, impl, dtype):
    """Base-only rows keep their bits, even when their u rows are NaN (no adapter work reads
    them)."""
    monkeypatch.setenv("UORA_EXPAND_IMPL", impl)
    args = make_case(2049, (64, 2049), 16, 3, 133, "base_rows", True, dtype, "cuda", seed=5)
    expected = want(args)
    _, y, u = shrink_into_ext(args, dtype)
    base = args[7] < 0
    u[base] = float("nan")
    before = y.clone()
    ops.uora_expand_(y, u, args[3].to(dtype), *args[4:])
    assert torch.equal(y[base], before[base])
    assert_close(y[~base].cpu(), expected[~base.cpu()])


def test_long_reduction_error_within_twice_plain_torch():
    """STYLE §8: bf16, in = 11008, r = 256 with Q (K = 512): error against the float32 reference
    (y kept in float32, so unrounded) at most 2x that of the same computation in plain bf16 torch
    (docs/design.md §4 written out)."""
    args = make_case(11008, (4096,), 256, 6, 64, "distinct", True, torch.bfloat16, "cuda", seed=9)
    y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, offs, y_offs, outs, _ = args
    ref = reference.uora_group(y.cpu().float(), *[a.cpu() if torch.is_tensor(a) else a
                                                  for a in args[1:]]).double()
    r, out, m = lambda_d.shape[2], outs[0], modules[0]
    s = slot.long()
    u = x @ a_cat[:, : x.shape[1]].T.to(x.dtype)
    pp = p[s].to(x.dtype)
    h = lambda_d[s, m].to(x.dtype) * (pp * u[:, :r] + (1 - pp) * u[:, r:])
    v = torch.cat([pp * h, (1 - pp) * h], 1) @ b_cat[:out].T.to(x.dtype)
    torch_y = y.clone()
    torch_y[:, y_offs[0]:y_offs[0] + out] += lambda_b[s, offs[0]:offs[0] + out].to(x.dtype) * v
    ops.uora_group_(*args)
    ours = (y.cpu().double() - ref).norm()
    plain = (torch_y.cpu().double() - ref).norm()
    assert ours <= 2 * plain, (float(ours), float(plain))


def test_device_mismatch_is_named():
    args = make_case(64, (96,), 8, 2, 4, "distinct", True, torch.bfloat16, "cuda")
    bad = list(args)
    bad[7] = args[7].cpu()
    with pytest.raises(RuntimeError, match="slot: expected device cuda"):
        ops.uora_group_(*bad)


# ---- reinit and mix_projections ----------------------------------------------------------------


def reinit_state(layers, r, max_in, max_out, device):
    a0, b0, qa, qb = projections(3, r, max_in, max_out)
    s = {"counts": torch.zeros(layers, r, dtype=torch.int32), "p": torch.ones(r), "a": a0.clone(),
         "b": b0.clone(), "a0": a0, "qa": qa, "b0": b0, "qb": qb}
    return {k: v.to(device) for k, v in s.items()}


def reinit_step(s, lam, tau, k, alpha):
    return ops.reinit_(lam, s["counts"], s["p"], s["a"], s["b"], s["a0"], s["qa"], s["b0"],
                       s["qb"], tau, k, alpha)


def lambda_steps(steps, layers, r, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lam = torch.randn(layers, r, generator=g)
        lam[torch.rand(layers, r, generator=g) < 0.25] = 0.0
        lam[0, 0] = float("nan")
        out.append(lam)
    return out


@pytest.mark.parametrize("layers,r,max_in,max_out,k,alpha", [(1, 8, 24, 16, 1, 0.5),
                                                            (30, 64, 2049, 11008, 2, 0.5),
                                                            (7, 300, 333, 1000, 1, 0.7)])
def test_reinit_against_the_literal_rule(layers, r, max_in, max_out, k, alpha):
    tau, steps = 1e-5, lambda_steps(4, layers, r, seed=r)
    s = reinit_state(layers, r, max_in, max_out, "cuda")
    lit_a, lit_b = s["a0"].cpu().clone(), s["b0"].cpu().clone()
    counters = [torch.zeros(r, dtype=torch.int64) for _ in range(layers)]
    events = lit_events = 0
    for lam in steps:
        events += int(reinit_step(s, lam.cuda(), tau, k, alpha).sum())
        lit_events += reference.reinit_literal(list(lam), counters, lit_a, lit_b, s["qa"].cpu(),
                                               s["qb"].cpu(), tau, k, alpha)
    assert events == lit_events > 0
    assert torch.equal(s["counts"].cpu().long(), torch.stack(counters))
    torch.testing.assert_close(s["a"].cpu(), lit_a, atol=REINIT_LITERAL_ATOL, rtol=0)
    torch.testing.assert_close(s["b"].cpu(), lit_b, atol=REINIT_LITERAL_ATOL, rtol=0)
    ra, rb = reference.rebuild_projections(*(s[n].cpu() for n in ("a0", "qa", "b0", "qb", "p")))
    assert torch.equal(s["a"].cpu(), ra) and torch.equal(s["b"].cpu(), rb)  # the record, bit-exact
    a, b = ops.mix_projections(s["a0"], s["qa"], s["b0"], s["qb"], s["p"])
    assert torch.equal(a.cpu(), ra) and torch.equal(b.cpu(), rb)


# ---- CUDA graphs: capture once, replay bit-exact, follow in-place table updates ------------------


def capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS handles, attributes)
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def change_tables(args, seed):
    """New per-token slots and new adapter vectors, written in place (no recapture)."""
    g = torch.Generator().manual_seed(seed)
    slot, lambda_d, lambda_b, p = args[7], args[4], args[5], args[6]
    slot.copy_(torch.randint(-1, lambda_d.shape[0], slot.shape, generator=g).int())
    lambda_d.copy_(torch.randn(lambda_d.shape, generator=g))
    lambda_b.copy_(torch.randn(lambda_b.shape, generator=g))
    p.copy_(0.5 ** torch.randint(0, 4, p.shape, generator=g).float())


@pytest.mark.parametrize("op", ["expand", "group"])
@pytest.mark.parametrize("tokens", [7, 133])  # the fused route and the GEMM route
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_graph_replay_is_bit_exact_and_follows_tables(op, tokens, dtype):
    args = make_case(2049, (2049, 64), 32, 6, tokens, "zipf", True, dtype, "cuda", seed=tokens)
    y0 = args[0].clone()
    b_cat = args[3].to(dtype)
    _, y, u = shrink_into_ext(args, dtype)
    if op == "expand":
        def run():
            ops.uora_expand_(y, u, b_cat, *args[4:])
        out = y
    else:
        def run():
            ops.uora_group_(*args[:3], b_cat, *args[4:])
        out = args[0]
    graph = capture(run)
    for step in range(3):
        if step:
            change_tables(args, seed=step)
        out.copy_(y0)
        graph.replay()
        replayed = out.clone()
        out.copy_(y0)
        run()
        assert torch.equal(replayed, out), f"step {step}: replay differs from eager"
        args[0].copy_(y0)
        assert_close(replayed.cpu(), want(args), msg=f"step {step}")


def test_graph_replay_reinit_follows_lambda():
    layers, r, steps = 5, 64, lambda_steps(4, 5, 64, seed=1)
    sg = reinit_state(layers, r, 2049, 1000, "cuda")
    se = reinit_state(layers, r, 2049, 1000, "cuda")
    lam = steps[0].cuda()
    fires = {}

    def run():
        fires["g"] = reinit_step(sg, lam, 1e-5, 1, 0.5)

    graph = capture(run)  # the warm-up ran one step on sg: start both states over
    for k in sg:
        sg[k].copy_(se[k])
    for lam_k in steps:
        lam.copy_(lam_k)
        graph.replay()
        fe = reinit_step(se, lam_k.cuda(), 1e-5, 1, 0.5)
        assert torch.equal(fires["g"], fe)
    assert int(sg["counts"].sum()) > 0
    for k in ("counts", "p", "a", "b"):
        assert torch.equal(sg[k], se[k]), k
    ra, rb = reference.rebuild_projections(*(se[n].cpu() for n in ("a0", "qa", "b0", "qb", "p")))
    assert torch.equal(sg["a"].cpu(), ra) and torch.equal(sg["b"].cpu(), rb)
