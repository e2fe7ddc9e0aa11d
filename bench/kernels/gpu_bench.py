"""GPU benchmark plumbing shared by bench/bench_layer_gpu.py and the kernel sandbox: one adapted
linear layer with 64 adapters, the methods that compute it, CUDA-event timing with the L2 flushed,
CUDA-graph timing over layers that stream their weights, and the card's measured ceilings."""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from uora_rt.kernels import ops, triton_expand

BF16 = torch.bfloat16
_flush_buf = None


def flush_l2():
    """Writes 512 MB (H200 L2: 60 MB), so the next kernel finds none of its inputs in L2."""
    global _flush_buf
    if _flush_buf is None:
        _flush_buf = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    _flush_buf.fill_(1)


def time_cold(fn, reps=15, warmup=3) -> float:
    """Median µs of fn() (CUDA events), L2 flushed before each repetition."""
    for _ in range(warmup):
        fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        flush_l2()
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3


def time_graph(layer_fns, reps=20) -> float:
    """Median µs per layer of a CUDA graph that runs every fn of layer_fns once (one per layer,
    each with its own weights, so weights stream from HBM while shared tensors may stay in L2 as
    they do in a decode step)."""
    def step():
        for fn in layer_fns:
            fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        graph.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        graph.replay()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) * 1e3 / len(layer_fns)


def ceilings() -> dict:
    """Measured here and now: D2D copy bandwidth (read + write) and a large bf16 matmul rate."""
    n = 2 * 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    copy_us = time_cold(lambda: dst.copy_(src), reps=10)
    a = torch.randn(8192, 8192, device="cuda", dtype=BF16)
    b = torch.randn(8192, 8192, device="cuda", dtype=BF16)
    mm_us = time_cold(lambda: a @ b, reps=10)
    return {"copy_TBps": 2 * n / copy_us / 1e6, "bf16_mm_TFLOPs": 2 * 8192**3 / mm_us / 1e6}


@dataclass
class Layer:
    """One adapted linear (out x in), bf16, 64 adapters in slots 0..63, T tokens, distinct
    spread."""
    out: int
    inp: int
    r: int
    T: int
    with_q: bool
    n_adapters: int = 64

    def __post_init__(self):
        out, inp, r, T, S = self.out, self.inp, self.r, self.T, self.n_adapters
        dev = "cuda"
        g = torch.Generator(device=dev).manual_seed(out + inp + r + T)

        def rn(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, device=dev) * scale

        self.R = 2 * r if self.with_q else r
        self.w = rn(out, inp, scale=inp**-0.5).to(BF16)
        self.a_cat = rn(2 * r, inp, scale=inp**-0.5).to(BF16)      # [A0; QA]
        self.b_cat = rn(out, 2 * r, scale=out**-0.5).to(BF16)      # [B0 | QB]
        self.w_ext = torch.cat([self.w, self.a_cat]).contiguous()   # the replaced fused weight
        self.u = torch.empty(T, self.R, device=dev, dtype=BF16)
        self.side = torch.cuda.Stream()
        self.table = triton_expand.module_table([0], [0], [0], [out], dev)
        self.lambda_d = rn(S, 1, r, scale=0.1)
        self.lambda_b = rn(S, out, scale=0.1)
        self.p = torch.where(torch.rand(S, r, generator=g, device=dev) < 0.3, 0.5, 1.0)
        self.slot = (torch.arange(T, device=dev) % S).int()   # all 64 distinct, round robin
        self.x = rn(T, inp).to(BF16)
        self.y = torch.empty(T, out, device=dev, dtype=BF16)

    # --- methods: each computes y = x W^T + the adapters' delta ---------------------------------
    def base(self):
        torch.matmul(self.x, self.w.t(), out=self.y)

    def parallel(self):
        """The runtime's GPU route (adapters.batch.AdapterBatch.group): the shrink from the
        shared A_cat on a side stream beside the base GEMM, then the Triton expand (the C++ op
        above triton_expand.MAX_ROWS rows)."""
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            torch.mm(self.x, self.a_cat[: self.R].t(), out=self.u)
        self.base()
        main.wait_stream(self.side)
        if self.y.shape[0] <= triton_expand.MAX_ROWS and self.b_cat.dtype == self.y.dtype:
            triton_expand.expand_(self.y, self.u, self.b_cat, self.lambda_d, self.lambda_b,
                                  self.p, self.slot, self.table, self.out, self.with_q)
        else:
            ops.uora_expand_(self.y, self.u, self.b_cat, self.lambda_d, self.lambda_b, self.p,
                             self.slot, [0], [0], [0], [self.out], self.with_q)

    def fused(self):
        """The route `parallel` replaced: the shrink inside the base GEMM (A_cat rows appended
        to a copy of W), then one uora_expand_."""
        n = self.out
        y_ext = F.linear(self.x, self.w_ext[: n + self.R])
        ops.uora_expand_(y_ext[:, :n], y_ext[:, n:], self.b_cat, self.lambda_d, self.lambda_b,
                         self.p, self.slot, [0], [0], [0], [n], self.with_q)
        return y_ext

    def group(self):
        """Base GEMM, then uora_group_ (its own shrink GEMM + expand)."""
        self.base()
        ops.uora_group_(self.y, self.x, self.a_cat, self.b_cat, self.lambda_d, self.lambda_b,
                        self.p, self.slot, [0], [0], [0], [self.out], self.with_q)

    def prepare_torch(self):
        self.t_ld = self.lambda_d[:, 0].to(BF16)
        self.t_lb = self.lambda_b.to(BF16)
        self.t_p = self.p.to(BF16)
        self.t_valid = (self.slot >= 0)[:, None]
        self.t_s = self.slot.long().clamp(min=0)

    def torch_comp(self):
        """docs/design.md §4 in plain torch (bf16), every stage a separate kernel."""
        self.base()
        r, s = self.r, self.t_s
        u = F.linear(self.x, self.a_cat[: self.R])
        ld = self.t_ld[s]
        if self.with_q:
            p = self.t_p[s]
            h = ld * (p * u[:, :r] + (1 - p) * u[:, r:])
            z = torch.cat([p * h, (1 - p) * h], 1)
        else:
            z = ld * u
        v = F.linear(z, self.b_cat[:, : self.R])
        self.y.addcmul_(self.t_lb[s] * self.t_valid, v)

    def prepare_loop(self):
        """Per-adapter matrices (what a LoRA-style server holds), rebuilt once from p."""
        r = self.r
        p = self.p[:, :, None]
        a = p * self.a_cat[:r].float() + (1 - p) * self.a_cat[r:].float()           # [S, r, in]
        self.l_a = (a * self.lambda_d[:, 0, :, None]).to(BF16)
        pb = self.p[:, None, :]
        self.l_b = (pb * self.b_cat[:, :r].float() + (1 - pb) * self.b_cat[:, r:].float()).to(BF16)
        self.l_lb = self.lambda_b.to(BF16)
        slot = self.slot.cpu()
        self.l_idx = [(s, (slot == s).nonzero()[:, 0].to("cuda")) for s in slot.unique().tolist()
                      if s >= 0]

    def peft_loop(self):
        """PEFT `_mixed_batch_forward` style: per adapter, gather its rows, two small GEMMs,
        scale, scatter-add."""
        self.base()
        for s, idx in self.l_idx:
            xs = self.x.index_select(0, idx)
            d = F.linear(F.linear(xs, self.l_a[s]), self.l_b[s]) * self.l_lb[s]
            self.y.index_add_(0, idx, d)

    # --- napkin math --------------------------------------------------------------------------
    def cost(self, method: str) -> tuple[float, float]:
        """(bytes, flops) each method must move/do at least (bf16 = 2 bytes)."""
        T, o, i, R, r = self.T, self.out, self.inp, self.R, self.r
        base_b, base_f = 2 * (o * i + T * i + T * o), 2 * T * i * o
        if method == "base":
            return base_b, base_f
        if method == "peft_loop":
            n = len(self.l_idx) if hasattr(self, "l_idx") else min(T, self.n_adapters)
            return base_b + 2 * n * r * (i + o) + 4 * T * o, base_f + 2 * T * r * (i + o)
        # ours and the torch composition: A_cat/B_cat rows read once, u and y's update
        extra_b = 2 * (R * i + o * R + T * R + 2 * T * o)
        return base_b + extra_b, base_f + 2 * T * R * (i + o)


def set_impl(impl: str | None, pdl: bool = True):
    """Route and PDL of the CUDA expand (env knobs read by the op on every call)."""
    if impl is None:
        os.environ.pop("UORA_EXPAND_IMPL", None)
    else:
        os.environ["UORA_EXPAND_IMPL"] = impl
    os.environ["UORA_PDL"] = "1" if pdl else "0"
