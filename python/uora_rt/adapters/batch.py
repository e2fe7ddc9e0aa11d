"""The adapter batch of one forward: each token's slot per projection family, and the adapter
math of every fused group GEMM, written once for every route and for tensor-parallel shards.

For a group (modules that read the same input) and a family (docs/design.md, the key identity):
    u = x A_catᵀ                     one shrink GEMM for every token of the family
    y += λ_b ⊙ (B_cat z(u, λ_d, p))  one expand for every token, whatever adapter it uses
The step's kernels.routes.Routes say how: the grouped C++ op after the base GEMM (the CPU), or a
shrink GEMM beside the base GEMM (on CUDA on a side stream) followed by the Triton or C++
expand, or, for small decode batches with the fused decoder kernels, the whole delta beside the
base GEMM into a float32 buffer that the consumer kernel adds (deferred).

Under tensor parallelism a column-parallel group (qkv, gate_up) holds a slice of each module's
outputs: the shrink reads the whole x, the expand the rank's rows of B_cat and λ_b. A
row-parallel group (o, down) holds a slice of the inputs: the partial base output and the
partial shrinks are summed by ONE all-reduce, then the bias and the expand follow on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uora_rt.kernels import ops, triton_expand
from uora_rt.kernels.dense import dense
from uora_rt.kernels.routes import Routes
from uora_rt.models.common import AdapterHook, Shard, base_linear, run_group


@dataclass
class FamilyView:
    """What one forward reads of a family (tensors captured when the batch was built)."""

    a_cat: torch.Tensor
    b_cat: torch.Tensor
    lambda_d: torch.Tensor
    lambda_b: torch.Tensor
    p: torch.Tensor
    groups: dict  # (layer, group) -> (module ids, lambda_b offsets, y offsets, outs)
    tables: dict  # (layer, group) -> (triton_expand.module_table, max out)
    with_q: bool
    token_slots: torch.Tensor  # [T] int32, -1 = not this family

    @property
    def rank(self) -> int:
        """Columns of u this family's expand reads: [A0 x | QA x], or A0 x alone without Q."""
        return self.lambda_d.shape[2] * (2 if self.with_q else 1)


class AdapterBatch(AdapterHook):
    """side_stream: a CUDA stream for adapter work beside the base GEMM (routes.side_stream)."""

    def __init__(self, families: list[FamilyView], routes: Routes, side_stream=None):
        self.families, self.routes, self.side_stream = families, routes, side_stream

    def group(self, layer, group, linear, x, shard: Shard | None = None,
              row_parallel: bool = False):
        fams = [f for f in self.families if (layer, group) in f.groups]
        if not fams:
            return run_group(None, layer, group, linear, x, shard, row_parallel)
        if row_parallel:
            return self._row_parallel(fams, layer, group, linear, x, shard), None
        if shard is None and self.routes.deferred:
            return self._deferred(fams, layer, group, linear, x)
        x2d = x.reshape(-1, x.shape[-1])
        if shard is None and not self.routes.parallel_shrink:
            y = base_linear(linear, x)
            y2d = y.view(-1, y.shape[-1])
            for f in fams:
                ops.uora_group_(y2d, x2d, f.a_cat, f.b_cat, f.lambda_d, f.lambda_b, f.p,
                                f.token_slots, *f.groups[(layer, group)], f.with_q)
            return y, None
        # u is allocated on the current stream, which frees it after the expands.
        us = [self._u(f, x2d, shard) for f in fams]

        def shrink():
            for f, u in zip(fams, us):
                _shrink(f, x2d, u)

        y = self._beside(linear, x, shrink)
        y2d = y.view(-1, y.shape[-1])
        for f, u in zip(fams, us):
            self._expand(f, layer, group, y2d, u, shard)
        return y, None

    def apply(self, layer, group, x2d, y2d):  # the AdapterHook interface (unused here)
        raise NotImplementedError("AdapterBatch computes whole groups (group())")

    @staticmethod
    def _u(f: FamilyView, x2d, shard):
        # Under tensor parallelism the shrink runs in the factors' dtype (float32 on the CPU),
        # as the row-parallel reduce does, so every rank rounds alike.
        dtype = f.a_cat.dtype if shard is not None else x2d.dtype
        return x2d.new_empty(x2d.shape[0], f.rank, dtype=dtype)

    def _expand(self, f: FamilyView, layer, group, y2d, u, shard: Shard | None) -> None:
        if shard is None and self.routes.triton_expand:
            table, max_out = f.tables[(layer, group)]
            triton_expand.expand_(y2d, u, f.b_cat, f.lambda_d, f.lambda_b, f.p, f.token_slots,
                                  table, max_out, f.with_q)
            return
        ids, offs, cols, outs = f.groups[(layer, group)]
        if shard is None:
            ops.uora_expand_(y2d, u, f.b_cat, f.lambda_d, f.lambda_b, f.p, f.token_slots, ids,
                             offs, cols, outs, f.with_q)
            return
        for m, off, col, out in zip(ids, offs, cols, outs):  # this rank's rows of each module
            o, k = out // shard.world, shard.rank
            ops.uora_expand_(y2d, u, f.b_cat[k * o:], f.lambda_d, f.lambda_b, f.p,
                             f.token_slots, [m], [off + k * o], [col // shard.world], [o],
                             f.with_q)

    def _deferred(self, fams, layer, group, linear, x):
        """(y, extra): the base GEMM on the current stream while the side stream computes every
        family's shrink and Triton expand into extra, a float32 [..., n_out] delta (zero where
        no adapter applies) that the consumer kernel adds as it reads y."""
        x2d = x.reshape(-1, x.shape[-1])
        n_out = linear.weight.shape[0]
        # Allocated on the current stream, which frees them after the consumer has read them.
        extra = torch.empty(x2d.shape[0], n_out, dtype=torch.float32, device=x.device)
        us = [x2d.new_empty(x2d.shape[0], f.rank) for f in fams]

        def adapters():
            extra.zero_()
            for f, u in zip(fams, us):
                _shrink(f, x2d, u)
                table, max_out = f.tables[(layer, group)]
                triton_expand.expand_(extra, u, f.b_cat, f.lambda_d, f.lambda_b, f.p,
                                      f.token_slots, table, max_out, f.with_q)

        y = self._beside(linear, x, adapters)
        return y, extra.view(*x.shape[:-1], n_out)

    def _beside(self, linear, x, work):
        """The base GEMM of x with `work` (adapter kernels) issued beside it: on CUDA on the
        side stream, which the current one forks to and joins before returning (in a captured
        graph, a parallel branch); elsewhere (CPU, Triton's interpreter) in order."""
        if self.side_stream is None or not x.is_cuda:
            work()
            return base_linear(linear, x)
        main, side = torch.cuda.current_stream(x.device), self.side_stream
        side.wait_stream(main)
        with torch.cuda.stream(side):
            work()
        y = base_linear(linear, x)
        main.wait_stream(side)
        return y

    def _row_parallel(self, fams, layer, group, linear, x, shard: Shard):
        x2d = x.reshape(-1, x.shape[-1])                                     # [T, in / N]
        n, start = linear.weight.shape[0], shard.rank * x2d.shape[1]
        dtype = x.dtype
        for f in fams:  # one buffer for the reduce: float32 when the factors are (CPU bf16)
            dtype = torch.promote_types(dtype, f.a_cat.dtype)
        parts = [dense(x2d, linear.weight).to(dtype)]                        # [T, n] partial
        for f in fams:
            a = f.a_cat[:f.rank, start:start + x2d.shape[1]]
            parts.append(F.linear(x2d.to(a.dtype), a).to(dtype))             # [T, R] partial
        buf = torch.cat(parts, dim=1)
        shard.all_reduce(buf)
        y = buf[:, :n]
        if linear.bias is not None:
            y += linear.bias
        col = n
        for f in fams:
            ops.uora_expand_(y, buf[:, col:col + f.rank], f.b_cat, f.lambda_d, f.lambda_b, f.p,
                             f.token_slots, *f.groups[(layer, group)], f.with_q)
            col += f.rank
        return y.to(x.dtype).reshape(*x.shape[:-1], n)


def _shrink(f: FamilyView, x2d: torch.Tensor, u: torch.Tensor) -> None:
    """u = x A_cat[:rank, :in]^T, from the family's one A_cat (in u's dtype)."""
    a = f.a_cat[: f.rank, : x2d.shape[1]]
    x = x2d if x2d.dtype == u.dtype else x2d.to(u.dtype)
    torch.mm(x, (a if a.dtype == u.dtype else a.to(u.dtype)).t(), out=u)
