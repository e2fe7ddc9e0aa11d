"""paged_attention_ (CPU) against reference.paged_attention: dtypes, GQA/MHA, head dims, block
sizes, lengths around page and tile boundaries, mixed prefill + decode batches, shuffled pages,
padding rows, strided q/out, garbage outside the live cache, bad input, opcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, assert_close
from uora_rt.kernels import ops, reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_batch(seq_lens, q_lens, *, n_heads=9, n_kv=3, hd=64, bs=16, dtype=torch.float32, pad=0,
               shuffle=True, spare=3, seed=0):
    """A paged cache with the sequences' pages (shuffled over the cache unless not shuffle),
    packed queries with `pad` padding rows, and NaN in every cache slot no sequence owns."""
    g = torch.Generator().manual_seed(seed)
    pages = [(n + bs - 1) // bs for n in seq_lens]
    n_blocks = sum(pages) + spare
    order = torch.randperm(n_blocks, generator=g) if shuffle else torch.arange(n_blocks)
    max_blocks = max(pages + [1]) + 1  # one unused column, filled with junk ids
    tables = torch.full((len(seq_lens), max_blocks), -7, dtype=torch.int32)
    k = torch.full((n_blocks, bs, n_kv, hd), float("nan"))
    v = torch.full_like(k, float("nan"))
    at = 0
    for b, (n, ctx) in enumerate(zip(pages, seq_lens)):
        tables[b, :n] = order[at:at + n].to(torch.int32)
        for p in range(ctx):  # only the live positions hold numbers
            blk, off = int(tables[b, p // bs]), p % bs
            k[blk, off] = torch.randn(n_kv, hd, generator=g)
            v[blk, off] = torch.randn(n_kv, hd, generator=g)
        at += n
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1] + pad, n_heads, hd, generator=g)
    return {"q": q.to(dtype), "k_cache": k.to(dtype), "v_cache": v.to(dtype),
            "block_tables": tables, "seq_lens": torch.tensor(seq_lens, dtype=torch.int32),
            "query_start": torch.tensor(starts, dtype=torch.int32), "scale": 1.0 / math.sqrt(hd)}


def run(batch, out=None):
    out = torch.full_like(batch["q"], float("nan")) if out is None else out
    ops.paged_attention_(out, **batch)
    return out


def check(batch):
    out = run(batch)
    ref = reference.paged_attention(**batch)
    assert torch.isfinite(out).all()
    assert_close(out, ref, dtype=batch["q"].dtype, table=TOL)
    return out


# seq_lens / q_lens of one mixed batch: decode rows, a chunk with context, a fresh prefill, an
# idle sequence (q_len 0) and an empty one (seq_len 0).
MIXED = ([37, 1, 300, 16, 17, 0, 130, 64], [1, 1, 1, 16, 5, 0, 0, 33])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)], ids=["gqa3", "mha", "mqa"])
@pytest.mark.parametrize("hd", [64, 128, 80])
def test_mixed_batch(dtype, heads, hd):
    check(make_batch(*MIXED, n_heads=heads[0], n_kv=heads[1], hd=hd, dtype=dtype, pad=3))


@pytest.mark.parametrize("bs", [1, 16, 32])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lengths_at_block_boundaries(bs, dtype):
    lens = sorted({n for k in (1, 2, 3) for n in (k * bs - 1, k * bs, k * bs + 1) if n > 0})
    # Each length as a decode row, as a full prefill and as a 3-token chunk after context.
    seq_lens = lens * 3
    q_lens = [1] * len(lens) + lens + [min(3, n) for n in lens]
    check(make_batch(seq_lens, q_lens, bs=bs, dtype=dtype))


@pytest.mark.parametrize("hd", [1, 13, 80])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_lengths_and_head_dims(hd, dtype):
    check(make_batch([1, 3, 7, 133, 1025, 64], [1, 3, 2, 133, 7, 1], n_heads=6, n_kv=2, hd=hd,
                     bs=16, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prefill_chunk_with_context_and_decode_rows(dtype):
    # 256 queries after 512 context (many query tiles and key chunks) next to 15 decode rows.
    seq_lens = [768] + [16 + 67 * i for i in range(15)]
    check(make_batch(seq_lens, [256] + [1] * 15, dtype=dtype, pad=5))


@pytest.mark.parametrize("q_len", [1, 5, 47, 48, 49, 97])
def test_tile_boundaries(q_len):
    # Query tiles hold 48 query vectors: 48 rows for MHA, 16 for a group of 3, 6 for a group of 8.
    for heads in [(4, 4), (9, 3), (8, 1)]:
        check(make_batch([q_len, q_len + 40], [q_len, q_len], n_heads=heads[0], n_kv=heads[1]))


def test_padding_rows_and_empty_sequences_are_zero():
    batch = make_batch([0, 5, 0], [0, 2, 0], pad=4)
    out = check(batch)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    # Nothing to do at all: every row is padding.
    batch = make_batch([0, 0], [0, 0], pad=3)
    assert torch.equal(run(batch), torch.zeros_like(batch["q"]))
    batch = make_batch([4], [0], pad=0)  # T = 0
    assert run(batch).shape == (0, 9, 64)


def test_physical_page_order_does_not_matter():
    ordered = make_batch(*MIXED, shuffle=False)
    shuffled = make_batch(*MIXED, shuffle=False)
    perm = torch.randperm(shuffled["k_cache"].shape[0])  # new block id of old block i: perm[i]
    for name in ("k_cache", "v_cache"):
        moved = torch.empty_like(shuffled[name])
        moved[perm] = shuffled[name]
        shuffled[name] = moved
    live = shuffled["block_tables"] >= 0
    shuffled["block_tables"][live] = perm[shuffled["block_tables"][live].long()].to(torch.int32)
    assert torch.equal(run(ordered), run(shuffled))  # bit for bit: same sums, other addresses
    check(shuffled)


def test_strided_q_and_out_views():
    batch = make_batch(*MIXED, pad=2)
    q = batch["q"]
    qkv = torch.randn(q.shape[0], q.shape[1] + 6, q.shape[2])  # q as a slice of a fused projection
    qkv[:, :9] = q
    batch["q"] = qkv[:, :9]
    assert not batch["q"].is_contiguous()
    big = torch.full((q.shape[0], 2 * q.shape[1], q.shape[2]), 5.0)
    out = run(batch, out=big[:, ::2])
    assert_close(out, reference.paged_attention(**batch), dtype=torch.float32)
    assert torch.equal(big[:, 1::2], torch.full_like(big[:, 1::2], 5.0))  # untouched


def test_thread_count_does_not_change_bits():
    batch = make_batch(*MIXED)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(batch)
        torch.set_num_threads(max(2, n))
        many = run(batch)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_long_context_error_within_twice_sdpa(dtype):
    # STYLE 8: against the float32 reference, within 2x of plain PyTorch in the same dtype.
    batch = make_batch([3000, 2049], [1, 64], n_heads=4, n_kv=2, hd=128, dtype=dtype)
    exact = reference.paged_attention(**{**batch, "q": batch["q"].float(),
                                         "k_cache": batch["k_cache"].float(),
                                         "v_cache": batch["v_cache"].float()})
    torch_same_dtype = []
    for b in range(2):
        r0, r1 = int(batch["query_start"][b]), int(batch["query_start"][b + 1])
        ctx, bs = int(batch["seq_lens"][b]), batch["k_cache"].shape[1]
        pos = torch.arange(ctx)
        pages = batch["block_tables"][b, pos // bs].long()
        k = batch["k_cache"][pages, pos % bs].transpose(0, 1)
        v = batch["v_cache"][pages, pos % bs].transpose(0, 1)
        mask = pos[None, :] <= (ctx - (r1 - r0) + torch.arange(r1 - r0))[:, None]
        o = F.scaled_dot_product_attention(batch["q"][r0:r1].transpose(0, 1), k, v,
                                           attn_mask=mask, scale=batch["scale"], enable_gqa=True)
        torch_same_dtype.append(o.transpose(0, 1))
    err_torch = (torch.cat(torch_same_dtype).float() - exact).abs().max()
    err_op = (run(batch).float() - exact).abs().max()
    assert err_op <= 2 * err_torch, (err_op, err_torch)


def test_opcheck_schema_and_fake():
    batch = make_batch(*MIXED, pad=1, n_heads=4, n_kv=2, hd=16)
    args = (torch.zeros_like(batch["q"]), *batch.values())
    torch.library.opcheck(torch.ops.uora.paged_attention_.default, args)


# --- bad input: every message names the argument and the values it compared ---

def bad(match, **changes):
    batch = make_batch([20, 5], [3, 1], n_heads=4, n_kv=2, hd=16, bs=8)
    out = changes.pop("out", torch.empty_like(batch["q"]))
    batch.update(changes)
    with pytest.raises(RuntimeError, match=match):
        ops.paged_attention_(out, **batch)


def test_rejects_wrong_dtypes():
    b = make_batch([20, 5], [3, 1], n_heads=4, n_kv=2, hd=16, bs=8)
    bad(r"q: expected dtype float32, bfloat16 or float16, got Double",
        q=b["q"].double(), out=torch.empty_like(b["q"]).double())
    bad(r"k_cache: expected dtype Float, got Half", k_cache=b["k_cache"].half())
    bad(r"v_cache: expected dtype Float, got BFloat16", v_cache=b["v_cache"].bfloat16())
    bad(r"out: expected dtype Float, got Half", out=torch.empty_like(b["q"]).half())
    bad(r"block_tables: expected dtype Int, got Long", block_tables=b["block_tables"].long())
    bad(r"seq_lens: expected dtype Int, got Long", seq_lens=b["seq_lens"].long())
    bad(r"query_start: expected dtype Int, got Long", query_start=b["query_start"].long())


def test_rejects_wrong_shapes():
    b = make_batch([20, 5], [3, 1], n_heads=4, n_kv=2, hd=16, bs=8)
    k = b["k_cache"]
    assert k.shape == (7, 8, 2, 16)  # 3 + 1 pages and 3 spare
    bad(r"q: expected \[T, nH, hd\], got \[4, 64\]", q=b["q"].reshape(4, 64))
    bad(r"k_cache: expected \[num_blocks, block_size, nKV, hd\], got \[7, 8, 32\]",
        k_cache=k.reshape(7, 8, 32))
    bad(r"k_cache: expected \[num_blocks, block_size, nKV, hd = q's\] = \[7, 8, 2, 16\], "
        r"got \[7, 8, 2, 8\]", k_cache=k[..., :8].contiguous())
    bad(r"v_cache: expected .* = \[7, 8, 2, 16\], got \[7, 16, 2, 16\]",
        v_cache=torch.zeros(7, 16, 2, 16))
    bad(r"out: expected \[T, nH, hd\] = q's = \[4, 4, 16\], got \[4, 4, 8\]",
        out=torch.empty(4, 4, 8))
    bad(r"seq_lens: expected \[B\] = \[2\], got \[3\]", seq_lens=torch.tensor([20, 5, 1]).int())
    bad(r"query_start: expected \[B \+ 1\] = \[3\], got \[2\]",
        query_start=torch.tensor([0, 3]).int())
    bad(r"q: expected nH a multiple of nKV \(GQA\), got nH = 3, nKV = 2",
        q=b["q"][:, :3].contiguous(), out=torch.empty(4, 3, 16))
    bad(r"k_cache: expected a contiguous tensor", k_cache=k.transpose(1, 2).contiguous()
        .transpose(1, 2))
    bad(r"q: expected unit stride along hd", q=b["q"].transpose(0, 2).contiguous()
        .transpose(0, 2))


def test_rejects_bad_table_values():
    bad(r"sequence 1: q_len = query_start\[2\] - query_start\[1\] = 6 exceeds seq_lens\[1\] = 5",
        query_start=torch.tensor([0, 3, 9]).int(), q=torch.randn(9, 4, 16),
        out=torch.empty(9, 4, 16))
    bad(r"query_start\[0\]: expected 0, got 1", query_start=torch.tensor([1, 3, 4]).int())
    bad(r"query_start: expected non-decreasing, got query_start\[1\] = 3 > query_start\[2\] = 2",
        query_start=torch.tensor([0, 3, 2]).int())
    bad(r"query_start\[B = 2\] = 5: expected <= T = 4", query_start=torch.tensor([0, 3, 5]).int())
    bad(r"seq_lens\[1\] = -1: expected >= 0", seq_lens=torch.tensor([20, -1]).int())
    bad(r"seq_lens\[0\] = 40: needs 5 blocks of 8, expected <= max_blocks = 4",
        seq_lens=torch.tensor([40, 5]).int())
    tables = make_batch([20, 5], [3, 1], n_heads=4, n_kv=2, hd=16, bs=8)["block_tables"]
    t = tables.clone()
    t[0, 2] = 7
    bad(r"block_tables\[0, 2\] = 7: expected in \[0, num_blocks = 7\)", block_tables=t)
    t = tables.clone()
    t[1, 0] = -1
    bad(r"block_tables\[1, 0\] = -1: expected in \[0, num_blocks = 7\)", block_tables=t)
    bad(r"scale: expected a finite number, got nan", scale=float("nan"))


def test_junk_outside_the_live_cache_is_never_read():
    # make_batch fills unowned slots with NaN and unused table columns with -7; idle sequences
    # (q_len 0) may even point anywhere.
    batch = make_batch([20, 5, 9], [3, 1, 0], n_heads=4, n_kv=2, hd=16, bs=8)
    batch["block_tables"][2] = 1000
    check(batch)
