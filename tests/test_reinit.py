"""The vectorized reinit op against the literal published rule, and the compact record's
exactness."""

import pytest
import torch

from conftest import REINIT_LITERAL_ATOL
from uora_rt.kernels import ops, reference
from uora_rt import projections

R, MAX_IN, MAX_OUT = 8, 24, 16


def make_state(layers):
    a0, b0, qa, qb = projections(3, R, MAX_IN, MAX_OUT)
    return dict(counts=torch.zeros(layers, R, dtype=torch.int32), p=torch.ones(R),
                a=a0.clone(), b=b0.clone(), a0=a0, qa=qa, b0=b0, qb=qb)


def run_both(lambda_steps, tau=1e-5, k=1, alpha=0.5):
    """Applies the op and the literal rule over a sequence of steps ([L, r] lambda_d each)."""
    layers = lambda_steps[0].shape[0]
    s = make_state(layers)
    lit_a, lit_b = s["a0"].clone(), s["b0"].clone()
    lit_counters = [torch.zeros(R, dtype=torch.int64) for _ in range(layers)]
    op_events = lit_events = 0
    for lam in lambda_steps:
        fires = ops.reinit_(lam, s["counts"], s["p"], s["a"], s["b"], s["a0"], s["qa"], s["b0"],
                            s["qb"], tau, k, alpha)
        op_events += int(fires.sum())
        lit_events += reference.reinit_literal(list(lam), lit_counters, lit_a, lit_b, s["qa"],
                                               s["qb"], tau, k, alpha)
    assert op_events == lit_events
    assert torch.equal(s["counts"].long(), torch.stack(lit_counters))
    torch.testing.assert_close(s["a"], lit_a, atol=REINIT_LITERAL_ATOL, rtol=0)
    torch.testing.assert_close(s["b"], lit_b, atol=REINIT_LITERAL_ATOL, rtol=0)
    # The compact record rebuilds the live matrices bit for bit, by the op and by plain torch.
    a, b = ops.mix_projections(s["a0"], s["qa"], s["b0"], s["qb"], s["p"])
    ra, rb = reference.rebuild_projections(s["a0"], s["qa"], s["b0"], s["qb"], s["p"])
    assert torch.equal(a, s["a"]) and torch.equal(b, s["b"])
    assert torch.equal(ra, s["a"]) and torch.equal(rb, s["b"])
    return s, op_events


def lam(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_nothing_below_tau():
    steps = [lam([[0.1] * R, [-0.2] * R]) for _ in range(3)]
    s, events = run_both(steps)
    assert events == 0 and torch.equal(s["p"], torch.ones(R))
    assert torch.equal(s["a"], s["a0"]) and torch.equal(s["b"], s["b0"])


def test_single_event_moves_row_and_column_halfway():
    row = [0.1] * R
    row[3] = 0.0
    s, events = run_both([lam([row])])
    assert events == 1 and float(s["p"][3]) == 0.5
    torch.testing.assert_close(s["a"][3], 0.5 * s["a0"][3] + 0.5 * s["qa"][3], atol=0, rtol=0)
    assert torch.equal(s["a"][:3], s["a0"][:3]) and torch.equal(s["b"][:, 4:], s["b0"][:, 4:])


def test_two_layers_fire_the_same_index_in_one_step():
    l0, l1 = [0.1] * R, [0.1] * R
    l0[5] = 1e-7
    l1[5] = -1e-7
    s, events = run_both([lam([l0, l1])])
    assert events == 2 and float(s["p"][5]) == 0.25


def test_repeated_events_give_alpha_to_the_n():
    row = [0.1] * R
    row[1] = 0.0
    s, events = run_both([lam([row])] * 6)
    assert events == 6 and float(s["p"][1]) == 0.5**6
    assert int(s["counts"][0, 1]) == 6


def test_k_greater_than_one_fires_every_kth_observation():
    row = [0.1] * R
    row[0] = 0.0
    row[7] = 5e-6
    s, events = run_both([lam([row, [0.1] * R])] * 7, k=3)
    assert events == 4  # indices 0 and 7 at observations 3 and 6
    assert float(s["p"][0]) == 0.25 and int(s["counts"][0, 7]) == 7


def test_alpha_other_than_half_and_mixed_layers():
    g = torch.Generator().manual_seed(1)
    steps = [torch.where(torch.rand(3, R, generator=g) < 0.3, 0.0, 0.1) for _ in range(5)]
    run_both(steps, alpha=0.7, k=2)


def test_nan_never_fires():
    row = [float("nan")] * R
    _, events = run_both([lam([row])])
    assert events == 0


def test_bad_arguments_are_named():
    s = make_state(1)
    with pytest.raises(RuntimeError, match=r"p: expected \[r\] = \[8\], got \[7\]"):
        ops.reinit_(torch.zeros(1, R), s["counts"], torch.ones(7), s["a"], s["b"], s["a0"],
                    s["qa"], s["b0"], s["qb"], 1e-5, 1, 0.5)
    with pytest.raises(RuntimeError, match="counts: expected dtype Int"):
        ops.reinit_(torch.zeros(1, R), s["counts"].float(), s["p"], s["a"], s["b"], s["a0"],
                    s["qa"], s["b0"], s["qb"], 1e-5, 1, 0.5)
    with pytest.raises(RuntimeError, match="k: expected >= 1"):
        ops.reinit_(torch.zeros(1, R), s["counts"], s["p"], s["a"], s["b"], s["a0"], s["qa"],
                    s["b0"], s["qb"], 1e-5, 0, 0.5)


def test_opcheck_schemas_and_fakes():
    s = make_state(2)
    torch.library.opcheck(torch.ops.uora.reinit_.default,
                          (torch.zeros(2, R), s["counts"], s["p"], s["a"], s["b"], s["a0"],
                           s["qa"], s["b0"], s["qb"], 1e-5, 1, 0.5))
    torch.library.opcheck(torch.ops.uora.mix_projections.default,
                          (s["a0"], s["qa"], s["b0"], s["qb"], torch.rand(R)))


def test_record_never_underflows_to_zero():
    row = [0.1] * R
    row[2] = 0.0
    s = make_state(1)
    for _ in range(160):  # 0.5**160 underflows float32; the record is floored at 2**-64
        ops.reinit_(lam([row]), s["counts"], s["p"], s["a"], s["b"], s["a0"], s["qa"], s["b0"],
                    s["qb"], 1e-5, 1, 0.5)
    assert float(s["p"][2]) == 2.0**-64
    a, _ = ops.mix_projections(s["a0"], s["qa"], s["b0"], s["qb"], s["p"])
    assert torch.equal(a, s["a"])
    torch.testing.assert_close(s["a"][2], s["qa"][2], atol=0, rtol=0)  # below resolution
