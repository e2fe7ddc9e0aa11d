"""The Triton paged decode kernel against reference.paged_attention: on a GPU, or on the CPU in
Triton's interpreter (TRITON_INTERPRET=1, set before this file is imported). Skipped where
Triton is not installed (the CPU wheel of torch brings none)."""

import os

import pytest
import torch

from conftest import TOL, assert_close
from uora_rt.kernels import reference

triton = pytest.importorskip("triton", reason="needs Triton (comes with CUDA builds of torch)")
from uora_rt.kernels import triton_decode  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not (torch.cuda.is_available() or INTERPRET):
    pytest.skip("needs a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
# numpy has no bfloat16: the interpreter cannot run it (the GPU does).
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def paged(lens, n_kv, hd, bs, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 2
    k = torch.randn(nb, bs, n_kv, hd, generator=g).to(dtype)
    v = torch.randn(nb, bs, n_kv, hd, generator=g).to(dtype)
    order = torch.randperm(nb - 1, generator=g) + 1  # physical blocks out of order
    table = torch.zeros(len(lens), max(max(need), 1), dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = order[used:used + n].int()
        used += n
    return k, v, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv,hd", [(4, 4, 64), (8, 2, 128), (9, 3, 64), (8, 8, 80)])
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("split", [None, 1, 3, 16])
def test_decode_equals_reference(dtype, n_heads, n_kv, hd, bs, split):
    lens = [1, bs - 1, bs, bs + 1, 3 * bs + 5, 0, 200]
    k, v, table = paged(lens, n_kv, hd, bs, dtype)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(lens), n_heads, hd, generator=g).to(dtype)
    seq = torch.tensor(lens, dtype=torch.int32)
    want = reference.paged_attention(q, k, v, table, seq, torch.arange(len(lens) + 1,
                                     dtype=torch.int32), hd ** -0.5)
    dev = [t.to(DEVICE) for t in (q, k, v, table, seq)]
    out = torch.full_like(dev[0], float("nan"))
    triton_decode.paged_decode(out, *dev, hd ** -0.5, n_splits=split)
    assert_close(out.cpu().float(), want.float(), dtype=dtype, table=TOL)


def test_padding_rows_are_zero_and_splits_agree():
    lens = [0, 40, 17, 0]
    k, v, table = paged(lens, 2, 64, 16, torch.float32, seed=3)
    q = torch.randn(4, 4, 64)
    dev = [t.to(DEVICE) for t in (q, k, v, table, torch.tensor(lens, dtype=torch.int32))]
    outs = []
    for n in (1, 2, 5, 16):
        out = torch.full_like(dev[0], float("nan"))
        triton_decode.paged_decode(out, *dev, 0.125, n_splits=n)
        outs.append(out.cpu())
    for o in outs:
        assert torch.equal(o[0], torch.zeros_like(o[0])) and torch.equal(o[3], o[0])
        torch.testing.assert_close(o, outs[0], atol=1e-6, rtol=1e-5)
