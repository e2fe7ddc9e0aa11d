"""The Triton paged prefill kernel against reference.paged_attention: packed chunks of several
sequences with context in the page table (and 1-row chunks), on a GPU or in Triton's
interpreter (TRITON_INTERPRET=1). Skipped where Triton is not installed."""

import pytest
import torch

from conftest import TOL, assert_close
# The decode tests' module carries the Triton / device skips and the device and dtype choice.
from test_triton_decode import DEVICE, DTYPES, paged
from uora_rt.kernels import reference
from uora_rt.kernels import triton_prefill


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_heads,n_kv,hd", [(4, 4, 64), (9, 3, 64), (8, 2, 80)])
@pytest.mark.parametrize("bs", [16, 32])
def test_prefill_equals_reference(dtype, n_heads, n_kv, hd, bs):
    # (context before the chunk, chunk length): fresh prompts, chunks after context, a chunk
    # ending on a block boundary, one row, a chunk longer than a tile
    shapes = [(0, 5), (40, 17), (bs - 3, 3), (0, 1), (7, 1), (2 * bs, 2 * bs), (0, 37)]
    lens = [c + n for c, n in shapes]
    k, v, table = paged(lens, n_kv, hd, bs, dtype, seed=2)
    q_start = [0]
    for _, n in shapes:
        q_start.append(q_start[-1] + n)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(q_start[-1], n_heads, hd, generator=g).to(dtype)
    qs = torch.tensor(q_start, dtype=torch.int32)
    seq = torch.tensor(lens, dtype=torch.int32)
    want = reference.paged_attention(q, k, v, table, seq, qs, hd ** -0.5)
    tiles = torch.tensor(triton_prefill.tiles_for(q_start), dtype=torch.int32).reshape(-1, 2)
    dev = [t.to(DEVICE) for t in (q, k, v, table, seq, qs, tiles)]
    out = torch.full_like(dev[0], float("nan"))
    triton_prefill.paged_prefill(out, dev[0], dev[1], dev[2], dev[3], dev[4], dev[5], dev[6],
                                 hd ** -0.5)
    assert_close(out.cpu().float(), want.float(), dtype=dtype, table=TOL)
