"""uora::process_logits_ and uora::record_tokens_ (the CPU logit processors) against
kernels/reference.py, exactly; bad tables are errors that name the entry and change nothing.
The engine's results against transformers' processors: test_engine_fields.py."""

import math

import pytest
import torch
from uora_rt.kernels import ops, reference

V, S, L = 500, 6, 40


def tables(seed: int):
    """Tables as engine.processors.ProcessorState keeps them, with the cases that matter:
    repeated tokens in a history, stop ids also in the history and in logit_bias, rows with
    no penalty, negative penalties, padding (first entry repeated, token 0 with bias 0)."""
    g = torch.Generator().manual_seed(seed)
    scal = torch.tensor([[1.0, 0.0, 0.0], [1.3, 0.5, 1.5], [0.8, -1.0, -0.5], [1.0, 2.0, 0.0],
                         [1.2, 0.0, 0.0], [1.0, 0.0, 0.0]])
    min_tokens = torch.tensor([0, 5, 0, 30, 2, 9])
    stops = torch.tensor([[0, 0], [2, 9], [0, 0], [7, 7], [3, 11], [2, 2]])
    bias_tok = torch.tensor([[0, 0, 0], [4, 7, 0], [1, 2, 3], [0, 0, 0], [9, 0, 0], [5, 6, 8]])
    bias_val = torch.tensor([[0.0, 0, 0], [2.0, -3.0, 0], [0.5, -100, 1], [0, 0, 0],
                             [1e30, 0, 0], [-math.inf, 1, 2]])
    hist = torch.randint(0, 20, (S, L), generator=g)  # small ids: many repeats
    hist[1, :4] = torch.tensor([2, 9, 2, 4])  # stop and bias ids in the history
    pen = torch.randn(S, L, generator=g).abs()
    pen[scal[:, 1:].eq(0).all(1)] = 0  # as the engine keeps them: 0 without count penalties
    return scal, min_tokens, stops, bias_tok, bias_val, hist, pen


def step(seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    logits = torch.randn(8, V, generator=g) * 4
    logits[0, 3] = -0.0
    logits[2, 5] = math.inf
    rows = torch.tensor([6, 0, 2, 3, 7, 1])  # not every logits row is processed
    slots = torch.tensor([1, 2, 0, 3, 4, 5])
    lens = torch.tensor([12, 1, 30, 25, 39, 5])
    pos = torch.tensor([3, 0, 10, 20, 1, 5])
    return logits, rows, slots, lens, pos


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_process_logits_equals_reference_exactly(seed):
    logits, rows, slots, lens, pos = step(seed)
    t = tables(seed)
    want = reference.process_logits(logits, rows, slots, lens, pos, *t)
    got = logits.clone()
    ops.process_logits_(got, rows, slots, lens, pos, *t)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert torch.equal(got.signbit(), want.signbit())  # -0.0 stays where the reference keeps it
    assert not torch.equal(got, logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_record_tokens_equals_reference_exactly(seed):
    _, rows, slots, lens, pos = step(seed)
    scal, _, _, _, _, hist, pen = tables(seed)
    tokens = torch.randint(0, 20, (8,), generator=torch.Generator().manual_seed(seed))
    tokens[rows[1]] = hist[slots[1], 0]  # a token the row has seen
    want_h, want_p = reference.record_tokens(hist, pen, tokens, rows, slots, lens, pos, scal)
    ops.record_tokens_(hist, pen, tokens, rows, slots, lens, pos, scal)
    assert torch.equal(hist, want_h)
    assert torch.equal(pen, want_p)


def test_one_step_then_the_next_sees_the_drawn_token():
    """process, record, process again: the second processing penalizes the drawn token."""
    logits, rows, slots, lens, pos = step(5)
    scal, mn, stops, bt, bv, hist, pen = tables(5)
    ops.record_tokens_(hist, pen, torch.full((8,), 17), rows, slots, lens, pos, scal)
    got = logits.clone()
    ops.process_logits_(got, rows, slots, lens + 1, pos + 1, scal, mn, stops, bt, bv, hist, pen)
    want = reference.process_logits(logits, rows, slots, lens + 1, pos + 1, scal, mn, stops, bt,
                                    bv, hist, pen)
    assert torch.equal(got, want)
    # slot 3 (logits row 3) has frequency 2, rep 1, presence 0: token 17 drops by 2 * its count
    n = int((hist[3, 26 - 21:26] == 17).sum())
    assert n >= 1 and float(got[3, 17]) == pytest.approx(float(logits[3, 17]) - 2 * n)


@pytest.mark.parametrize("what, change, message", [
    ("rows", lambda a: a["rows"].__setitem__(2, 8), r"rows\[2\] = 8: expected in \[0, 8\)"),
    ("slots", lambda a: a["slots"].__setitem__(0, -1), r"slots\[0\] = -1"),
    ("lens", lambda a: a["lens"].__setitem__(1, 0), r"lens\[1\] = 0: expected in \[1, 40\]"),
    ("lens", lambda a: a["lens"].__setitem__(1, 41), r"lens\[1\] = 41"),
    ("pos", lambda a: a["pos"].__setitem__(3, 26), r"pos\[3\] = 26: expected in \[0, lens"),
    ("stops", lambda a: a["stops"].__setitem__((5, 1), V), r"stops\[5, 1\] = 500"),
    ("bias_tok", lambda a: a["bias_tok"].__setitem__((2, 0), -3), r"bias_tok\[2, 0\] = -3"),
    ("hist", lambda a: a["hist"].__setitem__((4, 38), V + 1), r"hist\[4, 38\] = 501"),
    ("dtype", lambda a: a.__setitem__("pen", a["pen"].double()), r"pen"),
    ("rows", lambda a: a["rows"].__setitem__(3, 6), r"rows\[3\] = 6: listed twice"),
    ("slots", lambda a: a["slots"].__setitem__(5, 1), r"slots\[5\] = 1: listed twice"),
])
def test_bad_tables_are_errors_that_change_nothing(what, change, message):
    logits, rows, slots, lens, pos = step(0)
    names = ("scal", "min_tokens", "stops", "bias_tok", "bias_val", "hist", "pen")
    a = dict(rows=rows, slots=slots, lens=lens, pos=pos, **dict(zip(names, tables(0))))
    change(a)
    got = logits.clone()
    with pytest.raises(RuntimeError, match=message):
        ops.process_logits_(got, a["rows"], a["slots"], a["lens"], a["pos"],
                            *(a[n] for n in names))
    assert torch.equal(got, logits)


def test_record_refuses_a_history_that_is_full_and_writes_nothing():
    _, rows, slots, lens, pos = step(0)
    scal, *_, hist, pen = tables(0)
    lens[4] = L  # no room for the token
    before = hist.clone(), pen.clone()
    with pytest.raises(RuntimeError, match=r"lens\[4\] = 40: expected in \[0, 39\]"):
        ops.record_tokens_(hist, pen, torch.zeros(8, dtype=torch.long), rows, slots, lens, pos,
                           scal)
    assert torch.equal(hist, before[0]) and torch.equal(pen, before[1])


def test_opcheck_schemas_and_fakes():
    """The schemas' (a!) marks name exactly what each op writes; the fake kernels agree."""
    logits, rows, slots, lens, pos = step(3)
    t = tables(3)
    torch.library.opcheck(torch.ops.uora.process_logits_.default,
                          (logits, rows, slots, lens, pos, *t))
    scal, *_, hist, pen = t
    torch.library.opcheck(torch.ops.uora.record_tokens_.default,
                          (hist, pen, torch.arange(8), rows, slots, lens, pos, scal))
