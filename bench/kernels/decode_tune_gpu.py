"""Launch-setting sweeps for the decode step's two biggest Triton kernels on the GPU: the paged
decode attention (engine/triton_decode.py) and the multi-adapter expand (triton_expand.py), on
the shapes of bench/bench_decode_gpu.py (Llama-2-7B: 32 heads, hd 128, contexts 532; Llama-3.1-8B
GQA 8). Each setting is timed in a CUDA graph of 8 calls (as the decode graph runs them; median
of 20 replays, per call) after a check against the current setting's output.

  python bench/kernels/decode_tune_gpu.py OUT.json
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "tests"))
from test_group_op import make_case  # noqa: E402

from uora_rt.kernels import triton_expand  # noqa: E402
from uora_rt.kernels import triton_decode  # noqa: E402


def graph_us(fn, calls=8, reps=20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def attention_case(batch, n_heads, n_kv, length, hd=128, bs=16):
    nb = batch * (-(-length // bs)) + 1
    k = torch.randn(nb, bs, n_kv, hd, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = (torch.randperm(nb - 1, device="cuda")[: batch * (-(-length // bs))] + 1).int()
    table = table.view(batch, -1)
    lens = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, n_heads, hd, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * length * n_kv * hd * 2
    return (out, q, k, v, table, lens, hd ** -0.5), kv_bytes


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "decode_tune.json"
    rows = []
    base_cfg = dict(triton_decode.CONFIG)
    for label, shape in (("7B b64", (64, 32, 32, 532)), ("7B b256", (256, 32, 32, 532)),
                         ("7B b1", (1, 32, 32, 532)), ("8B b64", (64, 32, 8, 532))):
        args, kv_bytes = attention_case(*shape)
        triton_decode.CONFIG.update(base_cfg)
        want = triton_decode.paged_decode(*args).clone()
        for bn, nw, ns in itertools.product((32, 64, 128), (4, 8), (2, 3)):
            triton_decode.CONFIG.update(block_n=bn, num_warps=nw, num_stages=ns)
            try:
                got = triton_decode.paged_decode(*args)
                err = (got.float() - want.float()).abs().max().item()
                us = graph_us(lambda: triton_decode.paged_decode(*args))
            except Exception as e:  # a setting that does not compile (shared memory) is skipped
                rows.append({"kernel": "decode", "case": label, "block_n": bn, "num_warps": nw,
                             "num_stages": ns, "error": repr(e)[:200]})
                continue
            rows.append({"kernel": "decode", "case": label, "block_n": bn, "num_warps": nw,
                         "num_stages": ns, "us": us, "TBps": kv_bytes / us / 1e6,
                         "max_abs_diff": err})
            print(f"decode {label} BN {bn:3} warps {nw} stages {ns}: {us:7.1f} us "
                  f"{kv_bytes / us / 1e6:.2f} TB/s (diff {err:.1e})", flush=True)
    triton_decode.CONFIG.update(base_cfg)
    base_x = dict(triton_expand.CONFIG)
    for tokens in (1, 64, 256):
        args = make_case(4096, (4096, 4096), 256, 64, tokens, "distinct", False, torch.bfloat16,
                         "cuda")
        y, x, a_cat, b_cat, lambda_d, lambda_b, p, slot, modules, offs, y_offs, outs, _ = args
        u = (x.float() @ a_cat[:, :4096].float().T).to(torch.bfloat16)
        table = triton_expand.module_table(modules, offs, y_offs, outs, "cuda")
        b16 = b_cat.to(torch.bfloat16)
        y0 = y.clone()

        def run():
            triton_expand.expand_(y, u, b16, lambda_d, lambda_b, p, slot, table, 4096, False)

        triton_expand.CONFIG.update(base_x)
        run()
        want = y.clone()
        for bn, bk, nw, ns in itertools.product((32, 64, 128), (64, 128), (4,), (None, 3)):
            triton_expand.CONFIG.update(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
            try:
                y.copy_(y0)
                run()
                err = (y.float() - want.float()).abs().max().item()
                us = graph_us(run)
            except Exception as e:
                rows.append({"kernel": "expand", "tokens": tokens, "block_n": bn, "block_k": bk,
                             "num_warps": nw, "num_stages": ns, "error": repr(e)[:200]})
                continue
            rows.append({"kernel": "expand", "tokens": tokens, "block_n": bn, "block_k": bk,
                         "num_warps": nw, "num_stages": ns, "us": us, "max_abs_diff": err})
            print(f"expand T {tokens:3} BN {bn:3} BK {bk:3} warps {nw} stages {ns}: "
                  f"{us:6.1f} us (diff {err:.1e})", flush=True)
        y.copy_(y0)
    Path(path).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
