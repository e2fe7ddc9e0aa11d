"""The multi-adapter expand (ops.uora_expand_'s semantics) as one Triton kernel for CUDA decode.

The C++ op takes, at decode sizes above T * R = 1024, its GEMM route: a mix kernel, one cuBLAS
GEMM per module and an epilogue kernel, ~15 us per adapted group at batch 64 (bench/
results/decode_gpu.json). This kernel does all of it per (column tile, token tile, module):
    z  = lambda_d[s, m] * (p * u[:, :r] + (1 - p) * u[:, r:2r])      (with_q; else lambda_d * u)
    v  = [B0 | QB] @ [p * z, (1 - p) * z]                           (B mixed through z: one dot)
    y += lambda_b[s, cols] * v                                      (one rounding to y's dtype)
for the rows of its tile whose slot s is in [0, slots); a tile with none costs one load.
B's tile is read once per token tile (L2 serves the re-reads), z is rounded to B's dtype for the
tensor-core dot (as the C++ kernels do). Semantics and tolerance: ops.uora_expand_ /
reference.uora_group.

Used for 16-bit y with b_cat in y's dtype and at most MAX_ROWS rows (decode); elsewhere the C++
op runs (kernels.routes decides, once per step).
"""

from __future__ import annotations

import torch

from uora_rt.kernels._triton import tl, triton

# Above this many rows the C++ op's GEMM route is as fast or faster (H200: equal at 256 decode
# rows in the 7B step, bench/results/decode_gpu.json; 28 against 15 us for one 4096 x 4096
# layer at T = 256 with Q, layer_gpu.json), so this kernel takes decode batches up to 64.
MAX_ROWS = 64
# Launch settings; bench/kernels/decode_tune_gpu.py sweeps them (NOTES.md has the choice).
CONFIG = {"block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": None}



if triton is not None:

    @triton.jit
    def _expand(y_ptr, u_ptr, b_ptr, ld_ptr, lb_ptr, p_ptr, slot_ptr, mod_ptr, n_rows,
                n_slots, n_mod, nb, s_y, s_u, s_b, s_slot, r: tl.constexpr, WITH_Q: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        j = tl.program_id(2)
        m_id = tl.load(mod_ptr + 4 * j)
        lb_off = tl.load(mod_ptr + 4 * j + 1)
        y_off = tl.load(mod_ptr + 4 * j + 2)
        out = tl.load(mod_ptr + 4 * j + 3)
        c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        t = (tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        s = tl.load(slot_ptr + t * s_slot, mask=t < n_rows, other=-1)
        valid = (t < n_rows) & (s >= 0) & (s < n_slots)
        if (tl.program_id(0) * BLOCK_N < out) & (tl.max(valid.to(tl.int32), axis=0) > 0):
            ss = tl.where(valid, s, 0).to(tl.int64)
            cmask = c < out
            acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, r, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                tk = valid[:, None] & (k < r)[None, :]
                bk = cmask[:, None] & (k < r)[None, :]
                u0 = tl.load(u_ptr + t[:, None] * s_u + k[None, :], mask=tk, other=0.0)
                lam = tl.load(ld_ptr + (ss[:, None] * n_mod + m_id) * r + k[None, :], mask=tk,
                              other=0.0)
                b0 = tl.load(b_ptr + c[:, None] * s_b + k[None, :], mask=bk, other=0.0)
                if WITH_Q:
                    uq = tl.load(u_ptr + t[:, None] * s_u + r + k[None, :], mask=tk, other=0.0)
                    pk = tl.load(p_ptr + ss[:, None] * r + k[None, :], mask=tk, other=1.0)
                    z = lam * (pk * u0.to(tl.float32) + (1.0 - pk) * uq.to(tl.float32))
                    bq = tl.load(b_ptr + c[:, None] * s_b + r + k[None, :], mask=bk, other=0.0)
                    acc += tl.dot((pk * z).to(b0.dtype), tl.trans(b0))
                    acc += tl.dot(((1.0 - pk) * z).to(b0.dtype), tl.trans(bq))
                else:
                    z = lam * u0.to(tl.float32)
                    acc += tl.dot(z.to(b0.dtype), tl.trans(b0))
            ym = valid[:, None] & cmask[None, :]
            lb = tl.load(lb_ptr + ss[:, None] * nb + lb_off + c[None, :], mask=ym, other=0.0)
            yp = y_ptr + t[:, None] * s_y + y_off + c[None, :]
            yo = tl.load(yp, mask=ym, other=0.0)
            tl.store(yp, (yo.to(tl.float32) + lb * acc).to(yo.dtype), mask=ym)


def module_table(modules, lambda_b_offsets, y_offsets, outs, device) -> torch.Tensor:
    """[n, 4] int32 (module id, lambda_b offset, y offset, out) of one group, on its device."""
    rows = list(zip(modules, lambda_b_offsets, y_offsets, outs))
    return torch.tensor(rows, dtype=torch.int32, device=device).reshape(len(rows), 4)


def expand_(y, u, b_cat, lambda_d, lambda_b, p, slot, table, max_out: int, with_q: bool):
    """ops.uora_expand_ with the group's modules as a module_table (checked by the C++ op's
    callers: shapes come from one pool family)."""
    rows, r = y.shape[0], lambda_d.shape[2]
    if rows == 0 or table.shape[0] == 0:
        return
    cfg = CONFIG
    block_t = 16 if rows <= 16 else 32 if rows <= 32 else 64
    grid = (triton.cdiv(max_out, cfg["block_n"]), triton.cdiv(rows, block_t), table.shape[0])
    extra = {} if cfg["num_stages"] is None else {"num_stages": cfg["num_stages"]}
    _expand[grid](y, u, b_cat, lambda_d, lambda_b, p, slot, table, rows, lambda_d.shape[0],
                  lambda_d.shape[1], lambda_b.shape[1], y.stride(0), u.stride(0),
                  b_cat.stride(0), slot.stride(0), r=r, WITH_Q=with_q, BLOCK_T=block_t,
                  BLOCK_N=cfg["block_n"],
                  BLOCK_K=min(cfg["block_k"], max(16, triton.next_power_of_2(r))),
                  num_warps=cfg["num_warps"], **extra)
