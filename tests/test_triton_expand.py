"""The Triton expand (triton_expand.expand_) against reference.uora_group: on a GPU, or on the
CPU in Triton's interpreter (TRITON_INTERPRET=1, set before this file is imported). Skipped
where Triton is not installed."""

import pytest
import torch

from conftest import assert_close
from test_group_op import make_case
# The decode tests' module carries the Triton / device skips and the device choice.
from test_triton_decode import DEVICE, INTERPRET
from uora_rt.kernels import reference, triton_expand

# numpy has no bfloat16: the interpreter cannot run it (the GPU does).
DTYPES = [torch.float16] + ([] if INTERPRET else [torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,r", [((2049, (64, 48)), 16), ((111, (111, 37)), 40),
                                     ((64, (96, 32, 32)), 64), ((300, (200,)), 100)])
@pytest.mark.parametrize("tokens,kind", [(1, "distinct"), (7, "base_rows"), (33, "zipf"),
                                         (64, "segment"), (133, "identical")])
@pytest.mark.parametrize("with_q", [False, True])
def test_expand_equals_reference(dtype, shape, r, tokens, kind, with_q):
    in_f, outs = shape
    args = make_case(in_f, outs, r, 5, tokens, kind, with_q, dtype, DEVICE)
    y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, offs, y_offs, outs, _ = args
    want = reference.uora_group(*[a.cpu() if torch.is_tensor(a) else a for a in args])
    u = (x.float() @ a_cat[:, : x.shape[1]].float().T).to(dtype)  # the shrink, as a GEMM gives it
    u = torch.cat([u, torch.zeros(tokens, 5, dtype=dtype, device=DEVICE)], 1)  # wider is fine
    table = triton_expand.module_table(modules, offs, y_offs, outs, DEVICE)
    before = y.clone()
    triton_expand.expand_(y, u, b_cat.to(dtype), lambda_d, lambda_b, p, slot, table, max(outs),
                          with_q)
    assert_close(y.cpu(), want, dtype=dtype)
    base_rows = (slot < 0).cpu()
    assert torch.equal(y[base_rows].cpu(), before[base_rows].cpu())  # untouched, bit for bit


def test_out_of_range_slots_are_base_rows():
    args = make_case(64, (32,), 16, 3, 4, "distinct", True, torch.float16, DEVICE)
    y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, offs, y_offs, outs, _ = args
    slot.copy_(torch.tensor([3, -2, 7, 100], dtype=torch.int32))  # none in [0, 3)
    before = y.clone()
    u = torch.zeros(4, a_cat.shape[0], dtype=torch.float16, device=DEVICE)
    triton_expand.expand_(y, u, b_cat.half(), lambda_d, lambda_b, p, slot,
                          triton_expand.module_table(modules, offs, y_offs, outs, DEVICE), 32,
                          True)
    assert torch.equal(y, before)


@pytest.mark.skipif(INTERPRET, reason="CUDA graphs need a GPU")
def test_graph_replay_is_bit_exact():
    args = make_case(2049, (64, 48), 64, 5, 48, "base_rows", True, torch.bfloat16, DEVICE)
    y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, offs, y_offs, outs, _ = args
    u = (x.float() @ a_cat[:, : x.shape[1]].float().T).to(torch.bfloat16)
    table = triton_expand.module_table(modules, offs, y_offs, outs, DEVICE)
    b16 = b_cat.to(torch.bfloat16)
    start = y.clone()
    run = lambda: triton_expand.expand_(y, u, b16, lambda_d, lambda_b, p, slot, table,  # noqa
                                        max(outs), True)
    run()
    eager = y.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    y.copy_(start)
    graph.replay()
    assert torch.equal(y, eager)
