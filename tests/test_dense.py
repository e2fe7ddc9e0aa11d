"""models.common.dense: the CPU's few-row GEMM as (W·xᵀ)ᵀ equals F.linear within float32
rounding, for every row count around the switch, with and without bias, any leading shape;
autograd keeps F.linear itself."""

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from uora_rt.kernels.dense import SKINNY_ROWS, dense


@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16, SKINNY_ROWS, SKINNY_ROWS + 1, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_equals_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 40, generator=g)
    b = torch.randn(96, generator=g) if bias else None
    x = torch.randn(rows, 40, generator=g)
    y = dense(x, w, b)
    assert y.shape == (rows, 96) and y.is_contiguous()
    assert_close(y, F.linear(x.double(), w.double(), None if b is None else b.double()).float())
    x3 = x.reshape(1, rows, 40)  # leading dims are kept
    assert torch.equal(dense(x3, w, b), y.view(1, rows, 96))


def test_dense_leaves_autograd_and_other_dtypes_to_linear():
    w = torch.randn(8, 5, requires_grad=True)
    x = torch.randn(4, 5)
    y = dense(x, w)
    assert torch.equal(y, F.linear(x, w))
    y.sum().backward()
    assert w.grad is not None
    xb, wb = x.bfloat16(), w.detach().bfloat16()
    assert torch.equal(dense(xb, wb), F.linear(xb, wb))
