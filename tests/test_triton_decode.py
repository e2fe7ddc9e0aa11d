"""The Triton paged decode kernel against reference.paged_attention: on a GPU, or on the CPU in
Triton's interpreter (TRITON_INTERPRET=1, set before this file is imported). Skipped where
Triton is not installed (the CPU wheel of torch brings none)."""

import os

import pytest
import torch

from conftest import TOL, assert_close
from uora_rt import reference

triton = pytest.importorskip("triton", reason="needs Triton (comes with CUDA builds of torch)")
from uora_rt.engine import triton_decode  # noqa: E402

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
@pytest.mark.parametrize("split", [None, 16, 64])
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
    triton_decode.paged_decode(out, *dev, hd ** -0.5, max_len=256, split_tokens=split)
    assert_close(out.cpu().float(), want.float(), dtype=dtype, table=TOL)


def test_grid_fixed_for_a_longer_max_len_gives_the_same_result():
    # A CUDA graph captures the grid for the longest context the bucket allows; shorter
    # sequences must come out the same as with a tight grid.
    lens = [5, 40, 17]
    k, v, table = paged(lens, 2, 64, 16, torch.float32, seed=3)
    q = torch.randn(3, 4, 64)
    dev = [t.to(DEVICE) for t in (q, k, v, table, torch.tensor(lens, dtype=torch.int32))]
    tight, loose = torch.empty_like(dev[0]), torch.empty_like(dev[0])
    triton_decode.paged_decode(tight, *dev, 0.125, max_len=40, split_tokens=16)
    triton_decode.paged_decode(loose, *dev, 0.125, max_len=4096, split_tokens=16)
    assert torch.equal(tight, loose)
