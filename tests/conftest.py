"""Shared test settings: the one tolerance table, and device/skip helpers."""

import os

import pytest
import torch

# (atol, rtol) per dtype for comparisons of adapted outputs against a reference computed in the
# same dtype. float32 paths differ from the reference only by summation order.
TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (5e-3, 5e-3),
}
# Logits of whole models: errors accumulate over layers.
MODEL_TOL = {
    torch.float32: (2e-4, 2e-4),
    torch.bfloat16: (1.5e-1, 5e-2),
}
# The literal published reinit rule interpolates in place in float32; the compact record (p) is
# exact, the in-place iteration is not: after n events they differ by a few ulp of float32.
REINIT_LITERAL_ATOL = 1e-6


def assert_close(actual, expected, dtype=None, table=TOL, msg=""):
    atol, rtol = table[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at test time, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
