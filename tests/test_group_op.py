"""uora_group_ (the multi-adapter serving op) on every device against reference.uora_group."""

import itertools

import pytest
import torch

from conftest import assert_close
from uora_rt.kernels import ops, reference
from uora_rt import projections

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def spread(kind, tokens, slots, g):
    """Per-token slot ids for the adapter spreads that break kernels."""
    if kind == "distinct":
        s = torch.arange(tokens) % slots
    elif kind == "identical":
        s = torch.full((tokens,), 1 % slots)
    elif kind == "zipf":
        w = 1.0 / torch.arange(1, slots + 1, dtype=torch.float64)
        s = torch.multinomial(w, tokens, replacement=True, generator=g)
    elif kind == "segment":  # one huge segment, a few others at the end
        s = torch.zeros(tokens, dtype=torch.long)
        s[-min(3, tokens):] = torch.arange(min(3, tokens)) % slots
    else:  # base-only rows mixed in
        s = torch.randint(-1, slots, (tokens,), generator=g)
        s[0] = -1
    return s.to(torch.int32)


def make_case(in_f, outs, r, slots, tokens, kind, with_q, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    max_in, max_out = max(in_f, 8), max(max(outs), 8)
    r = min(r, max_in, max_out)
    a0, b0, qa, qb = projections(seed, r, max_in, max_out)
    a_cat, b_cat = torch.cat([a0, qa]), torch.cat([b0, qb], dim=1)
    if not with_q:
        a_cat, b_cat = a0, b0
    m = len(outs)
    lambda_d = torch.randn(slots, m + 1, r, generator=g)  # one extra module row, unused here
    nb = sum(outs) + 5
    lambda_b = torch.randn(slots, nb, generator=g)
    p = torch.where(torch.rand(slots, r, generator=g) < 0.3, 0.5 ** torch.randint(
        1, 5, (slots, r), generator=g).float(), torch.ones(slots, r))
    slot = spread(kind, tokens, slots, g)
    x = torch.randn(tokens, in_f, generator=g).to(dtype)
    y = torch.randn(tokens, sum(outs) + 3, generator=g).to(dtype)
    modules = list(range(1, m + 1))
    offs = [5 + sum(outs[:j]) for j in range(m)]
    y_offs = [3 + sum(outs[:j]) for j in range(m)]
    args = [y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, offs, y_offs, list(outs),
            with_q]
    return [a.to(device) if torch.is_tensor(a) else a for a in args]


CASES = list(itertools.product(
    [(111, (111, 37)), (2049, (64,)), (64, (96, 32, 32))],  # (in, outs of the group's modules)
    [1, 3, 7, 64, 133],
    ["distinct", "identical", "zipf", "segment", "base_rows"],
    [False, True]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,tokens,kind,with_q", CASES)
def test_group_op_float32(device, shape, tokens, kind, with_q):
    in_f, outs = shape
    args = make_case(in_f, outs, 16, 5, tokens, kind, with_q, torch.float32, device)
    want = reference.uora_group(*[a.cpu() if torch.is_tensor(a) else a for a in args])
    y = args[0]
    ops.uora_group_(*args)
    assert_close(y.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,with_q", [("zipf", True), ("base_rows", False), ("distinct", True)])
def test_group_op_half_dtypes(device, dtype, kind, with_q):
    args = make_case(111, (111, 37), 16, 4, 33, kind, with_q, dtype, device)
    want = reference.uora_group(*[a.cpu() if torch.is_tensor(a) else a for a in args])
    y = args[0]
    ops.uora_group_(*args)
    assert y.dtype == dtype
    assert_close(y.cpu(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_base_only_rows_are_untouched_bit_for_bit(device):
    args = make_case(64, (96, 32, 32), 16, 3, 20, "base_rows", True, torch.float32, device)
    y, slot = args[0], args[7]
    before = y.clone()
    ops.uora_group_(*args)
    base_rows = slot < 0
    assert torch.equal(y[base_rows], before[base_rows])
    assert not torch.equal(y[~base_rows], before[~base_rows])


def test_argument_errors_name_the_argument():
    args = make_case(64, (96,), 8, 2, 4, "distinct", True, torch.float32, "cpu")
    bad = list(args)
    bad[7] = args[7].long()
    with pytest.raises(RuntimeError, match="slot: expected dtype Int"):
        ops.uora_group_(*bad)
    bad = list(args)
    bad[11] = [200]
    with pytest.raises(RuntimeError, match=r"outs\[0\] = 200"):
        ops.uora_group_(*bad)
    bad = list(args)
    bad[7] = torch.tensor([0, 1, 2, 1], dtype=torch.int32)  # 2 slots: slot 2 does not exist
    with pytest.raises(RuntimeError, match=r"slot\[2\] = 2: expected < slots = 2"):
        ops.uora_group_(*bad)
    bad = list(args)
    bad[6] = args[6][:, :3]
    with pytest.raises(RuntimeError, match=r"p: expected \[slots, r\]"):
        ops.uora_group_(*bad)


def test_opcheck():
    args = make_case(64, (96, 32), 8, 3, 6, "zipf", True, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.uora.uora_group_.default, tuple(args),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,kind,with_q", [(1, "distinct", True), (7, "base_rows", False),
                                                (133, "zipf", True), (64, "segment", False)])
def test_expand_with_precomputed_shrink(device, dtype, tokens, kind, with_q):
    args = make_case(2049, (64, 48), 16, 5, tokens, kind, with_q, dtype, device)
    y, x, a_cat, b_cat = args[:4]
    want = reference.uora_group(*[a.cpu() if torch.is_tensor(a) else a for a in args])
    r2 = a_cat.shape[0]
    u = (x.float() @ a_cat[:, : x.shape[1]].float().T).to(dtype)  # as the fused base GEMM gives it
    # wider than R is fine
    u = torch.cat([u, torch.zeros(tokens, 5, dtype=dtype, device=device)], 1)
    ops.uora_expand_(y, u, b_cat.to(dtype), *args[4:])
    assert r2 in (16, 32)
    assert_close(y.cpu(), want, dtype=dtype)
