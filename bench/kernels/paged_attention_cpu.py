"""CPU paged attention (uora::paged_attention_) against the two SDPA routes it replaces.

Per setup, timed round-robin in one process on the same inputs (median of --repeats):
  kernel        ops.paged_attention_ on the paged cache (pages shuffled over the cache)
  gather+sdpa   gather each sequence's pages into dense [B, nKV, L, hd], then SDPA (GQA, mask)
  dense sdpa    SDPA on KV that is already dense (the gather not counted): the floor to beat
Setups (SmolLM2-135M attention: nH = 9, nKV = 3, hd = 64, block 16, float32 by default):
  decode300     32 sequences x 300 context, one query each
  decode_mixed  32 sequences, context uniform in 16..1024, one query each
  prefill_mix   one 256-query prefill chunk after 512 context + 15 decode rows (contexts as above)
Decode batches go to SDPA as one padded batch with a key mask (no mask when lengths are equal);
the mixed batch goes per sequence (padding 15 decode rows to 256 queries would be unfair to SDPA).

python bench/kernels/paged_attention_cpu.py [--repeats 21] [--dtype float32] [--layers 1]
    [--threads N] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common
from uora_rt.kernels import ops, reference

N_HEADS, N_KV, HD, BS = 9, 3, 64, 16


class Batch:
    """A paged cache holding B sequences (pages shuffled) and one step's packed queries.

    The dense layout given to SDPA is [B, nKV, L, hd] contiguous (what a dense KV cache holds);
    a strided view of the gathered pages would send SDPA down a much slower path.
    """

    def __init__(self, seq_lens, q_lens, dtype, layers=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.seq_lens_list, self.q_lens_list = list(seq_lens), list(q_lens)
        pages = [(n + BS - 1) // BS for n in seq_lens]
        n_blocks = sum(pages) + 8
        perm = torch.randperm(n_blocks, generator=g).to(torch.int32)
        self.block_tables = torch.zeros(len(pages), max(pages), dtype=torch.int32)
        at = 0
        for b, n in enumerate(pages):
            self.block_tables[b, :n] = perm[at:at + n]
            at += n
        shape = (n_blocks, BS, N_KV, HD)
        # One cache per layer; the calls rotate over them. With layers = 1 every call finds the
        # KV in the CPU caches; with enough layers it comes from DRAM, as in a real forward.
        self.caches = [(torch.randn(shape, generator=g).to(dtype),
                        torch.randn(shape, generator=g).to(dtype)) for _ in range(layers)]
        self.layer = 0
        self.k_cache, self.v_cache = self.caches[0]
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
        self.query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()],
                                        dtype=torch.int32)
        self.q = torch.randn(int(self.query_start[-1]), N_HEADS, HD, generator=g).to(dtype)
        self.out = torch.empty_like(self.q)
        self.scale = 1.0 / math.sqrt(HD)
        self.uniform_decode = set(q_lens) == {1} and len(set(seq_lens)) == 1
        self.denses = []  # pre-gathered KV per layer for the dense baseline
        for i in range(layers):
            self.k_cache, self.v_cache = self.caches[i]
            self.denses.append(self.gather())
        self.k_cache, self.v_cache = self.caches[0]
        self.dense = self.denses[0]

    def next_layer(self):
        self.layer = (self.layer + 1) % len(self.caches)
        self.k_cache, self.v_cache = self.caches[self.layer]
        self.dense = self.denses[self.layer]

    def kernel(self):
        ops.paged_attention_(self.out, self.q, self.k_cache, self.v_cache, self.block_tables,
                             self.seq_lens, self.query_start, self.scale)
        return self.out

    def gather(self):
        """Dense KV [B, nKV, L_max, hd] (padded) for decode batches; per-sequence list else."""
        if set(self.q_lens_list) == {1}:
            n, L = self.block_tables.shape[1], max(self.seq_lens_list)
            k = self.k_cache[self.block_tables.long()].reshape(-1, n * BS, N_KV, HD)[:, :L]
            v = self.v_cache[self.block_tables.long()].reshape(-1, n * BS, N_KV, HD)[:, :L]
            return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        out = []
        for b, ctx in enumerate(self.seq_lens_list):
            idx = self.block_tables[b, :(ctx + BS - 1) // BS].long()
            k = self.k_cache[idx].reshape(-1, N_KV, HD)[:ctx].transpose(0, 1).contiguous()
            v = self.v_cache[idx].reshape(-1, N_KV, HD)[:ctx].transpose(0, 1).contiguous()
            out.append((k, v))
        return out

    def sdpa(self, dense):
        if set(self.q_lens_list) == {1}:
            k, v = dense
            q = self.q.unsqueeze(2)  # [B, nH, 1, hd]
            mask = None
            if not self.uniform_decode:
                mask = (torch.arange(k.shape[2])[None, :] < self.seq_lens[:, None])[:, None, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=True)
            return o.squeeze(2)
        outs = []
        for b, (k, v) in enumerate(dense):
            r0, r1 = int(self.query_start[b]), int(self.query_start[b + 1])
            ctx, q_len = self.seq_lens_list[b], r1 - r0
            q = self.q[r0:r1].transpose(0, 1)  # [nH, q_len, hd]
            mask = None
            if q_len > 1:
                mask = torch.arange(ctx)[None, :] <= (ctx - q_len + torch.arange(q_len))[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=True)
            outs.append(o.transpose(0, 1))
        return torch.cat(outs)

    def flops_bytes(self):
        pairs = sum(q * (c - q) + q * (q + 1) // 2
                    for q, c in zip(self.q_lens_list, self.seq_lens_list))
        kv_bytes = 2 * sum(self.seq_lens_list) * N_KV * HD * self.k_cache.element_size()
        return 4.0 * pairs * N_HEADS * HD, kv_bytes


def setups(dtype, layers=1):
    g = torch.Generator().manual_seed(1)
    mixed = torch.randint(16, 1025, (32,), generator=g).tolist()
    yield "decode300", Batch([300] * 32, [1] * 32, dtype, layers)
    yield "decode_mixed", Batch(mixed, [1] * 32, dtype, layers)
    yield "prefill_mix", Batch([768] + mixed[:15], [256] + [1] * 15, dtype, layers)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=1,
                    help="rotate over this many layers' caches (KV cold in the CPU caches once "
                         "their total exceeds the last-level cache)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, help="also write one record per setup here")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = common.environment()
    print(f"torch {env['torch']}, {env['threads']} threads, git {env['git']}, {args.dtype}, "
          f"{args.layers} layer(s) rotated, load average {os.getloadavg()[0]:.1f}")
    records = []
    for name, bt in setups(dtype, args.layers):
        ref = reference.paged_attention(bt.q, bt.k_cache, bt.v_cache, bt.block_tables,
                                        bt.seq_lens, bt.query_start, bt.scale).float()
        err = (bt.kernel().float() - ref).abs().max().item()
        err_sdpa = (bt.sdpa(bt.dense).float() - ref).abs().max().item()
        def rotating(fn, bt=bt):
            def call():
                bt.next_layer()
                fn()
            return call
        t = common.interleaved_medians({
            "kernel": rotating(bt.kernel),
            "gather+sdpa": rotating(lambda bt=bt: bt.sdpa(bt.gather())),
            "dense sdpa": rotating(lambda bt=bt: bt.sdpa(bt.dense)),
        }, repeats=args.repeats, warmup=2)
        flops, kv_bytes = bt.flops_bytes()
        ms = {k: v * 1e3 for k, v in t.items()}
        print(f"{name:13s} kernel {ms['kernel']:7.3f} ms ({flops / t['kernel'] / 1e9:5.1f} GFLOP/s,"
              f" KV {kv_bytes / t['kernel'] / 1e9:5.1f} GB/s) | gather+sdpa "
              f"{ms['gather+sdpa']:7.3f} ms (x{t['gather+sdpa'] / t['kernel']:.2f}) | dense sdpa "
              f"{ms['dense sdpa']:7.3f} ms (x{t['dense sdpa'] / t['kernel']:.2f}) | max err "
              f"{err:.1e} (sdpa {err_sdpa:.1e})")
        records.append({"setup": name, "dtype": args.dtype, "seq_lens": bt.seq_lens_list,
                        "q_lens": bt.q_lens_list, "heads": N_HEADS, "kv_heads": N_KV, "hd": HD,
                        "block_size": BS, "layers": args.layers, "ms": ms, "flops": flops,
                        "kv_bytes": kv_bytes, "max_err": err, "max_err_sdpa": err_sdpa})
    if args.json:
        args.json.write_text(json.dumps({"env": env, "records": records}, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
