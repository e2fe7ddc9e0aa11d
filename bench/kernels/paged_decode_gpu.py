"""Decode attention on the GPU, one layer: the Triton paged decode (pages in place) against
SDPA on a dense KV (no mask, and with a per-row key mask: the old static path), by effective
bandwidth over the real K/V bytes against the copy ceiling.

  python bench/kernels/paged_decode_gpu.py      (needs CUDA and Triton; writes
                                                 bench/results/paged_decode_gpu.json)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_engine_gpu import copy_bandwidth, cuda_ms  # noqa: E402

from uora_rt.kernels import triton_decode  # noqa: E402


def case(batch, n_heads, n_kv, hd, lens, bs=16):
    dev, dt = "cuda", torch.bfloat16
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 1
    k = torch.randn(nb, bs, n_kv, hd, device=dev, dtype=dt)
    v = torch.randn_like(k)
    order = torch.randperm(nb - 1, device=dev) + 1
    table = torch.zeros(batch, max(need), dtype=torch.int32, device=dev)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = order[used:used + n].int()
        used += n
    seq = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(batch, n_heads, hd, device=dev, dtype=dt)
    out = torch.empty_like(q)
    cap = max(lens)
    kd = torch.randn(batch, n_kv, cap, hd, device=dev, dtype=dt)
    vd = torch.randn_like(kd)
    mask = (torch.arange(cap, device=dev)[None] < seq[:, None])[:, None, None]
    real = 2 * sum(lens) * n_kv * hd * 2
    q4 = q[:, :, None]
    res = {"batch": batch, "heads": n_heads, "kv_heads": n_kv, "head_dim": hd,
           "mean_len": sum(lens) / batch, "real_kv_bytes": real}
    for name, fn in [
        ("triton paged", lambda: triton_decode.paged_decode(out, q, k, v, table, seq, hd ** -.5)),
        ("sdpa dense, no mask", lambda: F.scaled_dot_product_attention(
            q4, kd, vd, enable_gqa=n_heads != n_kv)),
        ("sdpa dense, key mask", lambda: F.scaled_dot_product_attention(
            q4, kd, vd, attn_mask=mask, enable_gqa=n_heads != n_kv))]:
        ms = cuda_ms(fn, 50)
        res[name] = {"ms": ms, "real_TBps": real / (ms / 1e3) / 1e12}
    return res


def main():
    bw = copy_bandwidth()
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch, nh, nkv, hd in [(64, 32, 32, 128), (1, 32, 32, 128), (64, 32, 8, 128),
                               (256, 32, 8, 128)]:
        for lens in ([512] * batch, torch.randint(16, 1025, (batch,), generator=g).tolist()):
            r = case(batch, nh, nkv, hd, lens)
            rows.append(r)
            print(f"B={batch:3} H={nh}/{nkv} mean len {r['mean_len']:6.0f}: " + ", ".join(
                f"{k} {r[k]['ms'] * 1e3:.0f} us ({r[k]['real_TBps']:.2f} TB/s)" for k in
                ("triton paged", "sdpa dense, no mask", "sdpa dense, key mask")))
    print(f"copy ceiling {bw / 1e12:.2f} TB/s")
    common.write("paged_decode_gpu", [{"copy_TBps": bw / 1e12}] + rows)


if __name__ == "__main__":
    main()
