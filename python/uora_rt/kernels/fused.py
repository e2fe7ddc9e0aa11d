"""The decoder layer's elementwise work, fused for CUDA in Triton, with the torch composition as
the reference and the fallback.

A Llama layer in plain torch launches ~30 small kernels besides its GEMMs and attention (RMSNorm
alone is pow, mean, add, rsqrt, mul, cast, mul); at decode sizes each costs a few microseconds of
launch and tail, together ~27 % of the H200 decode step (docs/kernels.md has the profile).
Three kernels replace them:
- add_rms_norm: the residual add and the next RMSNorm in one pass over the row;
- rope_store: RoPE of q and k and the write of k and v into the paged KV cache;
- silu_mul: SiLU(gate) * up straight from the fused gate/up GEMM's output.
Each rounds where the torch composition rounds (to the model dtype after every op), so the
results differ from it only where the two compute a float32 reduction or exp differently.

kernels.routes decides once per step which set a forward uses (`elementwise(fused)`): Triton on
CUDA when no autograd is recorded (training keeps the differentiable torch ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from uora_rt.kernels._triton import tl, triton

# --- the torch composition (transformers' modeling_llama numerics) -----------------------------


def rms_norm(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [..., heads, hd]; cos, sin [..., 1, hd] (transformers' rotate_half convention)."""
    return x * cos + rotate_half(x) * sin


def with_extra(y, extra):
    """y with a pending float32 adapter delta added (one rounding, as uora_expand_ adds it)."""
    return y if extra is None else (y.float() + extra).to(y.dtype)


def torch_add_rms_norm(x, delta, weight, eps, extra=None):
    """(x + delta, rms_norm(x + delta)); delta None: (x, rms_norm(x)). extra: a float32 adapter
    delta still to be added to delta (an adapter expand deferred to this consumer)."""
    if delta is not None:
        x = x + with_extra(delta, extra)
    return x, rms_norm(x, weight, eps)


def torch_silu_mul(gate_up, extra=None):
    gate, up = with_extra(gate_up, extra).chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _add_rms_norm(x_ptr, d_ptr, e_ptr, w_ptr, xo_ptr, h_ptr, n, eps, sx, sd, se, sxo, sh,
                      HAS_D: tl.constexpr, HAS_E: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < n
        x = tl.load(x_ptr + row * sx + c, mask=mask, other=0.0)
        if HAS_D:
            d = tl.load(d_ptr + row * sd + c, mask=mask, other=0.0)
            if HAS_E:  # the adapter delta, rounded into delta first (with_extra)
                d = (d.to(tl.float32) + tl.load(e_ptr + row * se + c, mask=mask, other=0.0)
                     ).to(x.dtype)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(x.dtype)
            tl.store(xo_ptr + row * sxo + c, x, mask=mask)
        xf = x.to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n + eps)
        w = tl.load(w_ptr + c, mask=mask, other=0.0)
        hn = (xf * inv).to(x.dtype)
        tl.store(h_ptr + row * sh + c, (hn.to(tl.float32) * w.to(tl.float32)).to(x.dtype),
                 mask=mask)

    @triton.jit
    def _load_with_extra(qkv_ptr, e_ptr, t, s_qkv, s_e, col, m, HAS_E: tl.constexpr):
        x = tl.load(qkv_ptr + t * s_qkv + col, mask=m, other=0.0)
        if HAS_E:
            x = (x.to(tl.float32) + tl.load(e_ptr + t * s_e + col, mask=m, other=0.0)).to(x.dtype)
        return x

    @triton.jit
    def _rope_store(qkv_ptr, e_ptr, cos_ptr, sin_ptr, slot_ptr, q_ptr, kc_ptr, vc_ptr, s_qkv,
                    s_e, s_cs, n_heads, n_kv, half, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
                    HAS_E: tl.constexpr):
        """Program (token t, head h): h < n_heads ropes a query head into q; otherwise it ropes
        KV head h - n_heads into the key cache and copies its value into the value cache, at
        slot_mapping[t] ([num_blocks * block_size, n_kv, hd] views of the caches). HAS_E: a
        float32 adapter delta is added to qkv as it is read (with_extra)."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        j = tl.arange(0, HALF)
        m = j < half
        c = tl.load(cos_ptr + t * s_cs + j, mask=m, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + t * s_cs + j, mask=m, other=0.0).to(tl.float32)
        x1 = _load_with_extra(qkv_ptr, e_ptr, t, s_qkv, s_e, h * HEAD_DIM + j, m, HAS_E)
        x2 = _load_with_extra(qkv_ptr, e_ptr, t, s_qkv, s_e, h * HEAD_DIM + half + j, m, HAS_E)
        dt = x1.dtype
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        # torch: x * cos + rotate_half(x) * sin, each product rounded to the dtype, then the sum.
        o1 = ((f1 * c).to(dt).to(tl.float32) + (-f2 * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((f2 * c).to(dt).to(tl.float32) + (f1 * s).to(dt).to(tl.float32)).to(dt)
        if h < n_heads:
            dst = q_ptr + (t * n_heads + h) * HEAD_DIM
            tl.store(dst + j, o1, mask=m)
            tl.store(dst + half + j, o2, mask=m)
        else:
            g = h - n_heads
            slot = tl.load(slot_ptr + t)
            dst = kc_ptr + (slot * n_kv + g) * HEAD_DIM
            tl.store(dst + j, o1, mask=m)
            tl.store(dst + half + j, o2, mask=m)
            vcol = (n_heads + n_kv + g) * HEAD_DIM
            vdst = vc_ptr + (slot * n_kv + g) * HEAD_DIM
            tl.store(vdst + j, _load_with_extra(qkv_ptr, e_ptr, t, s_qkv, s_e, vcol + j, m, HAS_E),
                     mask=m)
            tl.store(vdst + half + j,
                     _load_with_extra(qkv_ptr, e_ptr, t, s_qkv, s_e, vcol + half + j, m, HAS_E),
                     mask=m)

    @triton.jit
    def _silu_mul(gu_ptr, e_ptr, out_ptr, n, s_gu, s_e, s_out, HAS_E: tl.constexpr,
                  BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = c < n
        g = _load_with_extra(gu_ptr, e_ptr, row, s_gu, s_e, c, mask, HAS_E)
        u = _load_with_extra(gu_ptr, e_ptr, row, s_gu, s_e, n + c, mask, HAS_E)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(out_ptr + row * s_out + c, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype),
                 mask=mask)



def _rows(x: torch.Tensor) -> torch.Tensor:
    """A [rows, n] view with unit column stride (a copy only when none exists)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def triton_add_rms_norm(x, delta, weight, eps, extra=None):
    x2 = _rows(x)
    n = x2.shape[1]
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    xo = x if delta is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    d2 = x2 if delta is None else _rows(delta)
    e2 = d2 if extra is None else _rows(extra)
    if x2.shape[0]:
        block = triton.next_power_of_2(n)
        _add_rms_norm[(x2.shape[0],)](x2, d2, e2, weight, xo, h, n, float(eps), x2.stride(0),
                                      d2.stride(0), e2.stride(0), n, n, HAS_D=delta is not None,
                                      HAS_E=delta is not None and extra is not None, BLOCK=block,
                                      num_warps=max(1, min(16, block // 256)))
    return xo, h


def triton_rope_store(qkv, cos, sin, slot_mapping, k_cache, v_cache, n_heads, n_kv, head_dim,
                      extra=None):
    """qkv [T, (nH + 2 nKV) hd] -> q [T, nH, hd] roped; roped k and v written at slot_mapping.
    cos, sin [T, ..., hd] (their first half is read: transformers' cat(freqs, freqs)). extra:
    a float32 adapter delta of qkv's shape, added as qkv is read (with_extra)."""
    t = qkv.shape[0]
    q = torch.empty(t, n_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if t:
        qkv2, cs = _rows(qkv), cos.reshape(t, head_dim)
        e2 = qkv2 if extra is None else _rows(extra)
        if sin.reshape(t, head_dim).stride(0) != cs.stride(0) or cs.stride(1) != 1:
            raise ValueError("rope_store: cos and sin need one layout with unit column stride")
        half = head_dim // 2
        _rope_store[(t, n_heads + n_kv)](qkv2, e2, cs, sin.reshape(t, head_dim), slot_mapping, q,
                                         k_cache, v_cache, qkv2.stride(0), e2.stride(0),
                                         cs.stride(0), n_heads, n_kv, half, HEAD_DIM=head_dim,
                                         HALF=triton.next_power_of_2(half),
                                         HAS_E=extra is not None, num_warps=1)
    return q


def triton_silu_mul(gate_up, extra=None):
    g2 = _rows(gate_up)
    e2 = g2 if extra is None else _rows(extra)
    n = g2.shape[1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    if g2.shape[0]:
        block = min(1024, triton.next_power_of_2(n))
        _silu_mul[(g2.shape[0], triton.cdiv(n, block))](g2, e2, out, n, g2.stride(0),
                                                        e2.stride(0), n,
                                                        HAS_E=extra is not None, BLOCK=block,
                                                        num_warps=4)
    return out


class Elementwise:
    """The elementwise ops of one forward: the Triton kernels (fused) or the torch composition."""

    def __init__(self, fused: bool):
        self.fused = fused
        self.add_rms_norm = triton_add_rms_norm if fused else torch_add_rms_norm
        self.silu_mul = triton_silu_mul if fused else torch_silu_mul


_SETS = {True: Elementwise(True), False: Elementwise(False)}


def elementwise(fused: bool) -> Elementwise:
    return _SETS[bool(fused)]
