"""The linears of one rank's forward under tensor parallelism, with their UORA adapters.

Column-parallel groups (qkv, gate_up) compute their slice of the outputs. The shrink u = A_cat x
needs the whole x, which every rank has, so A_cat and λ_d are used whole; module j's delta on
this rank is its rows [k·o, (k+1)·o) (o = out_j / N): the same rows of B_cat and of λ_b. The pool
stores the vectors whole on every rank (they are out + r floats per layer); a rank only reads
its slice, through λ_b offsets and a row view of B_cat.

Row-parallel groups (o, down) see a slice of the inputs, so the base output and the shrink are
both partial sums over ranks: each rank's partial shrinks (R = r or 2r numbers per token and
family) are concatenated to its partial base output so that ONE all-reduce carries both; the
bias and the expand (whole B_cat, whole λ_b) come after the sum, on every rank alike.

The adapter math itself is the pool's ops (uora_expand_), the same as on one device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from uora_rt.kernels import ops
from uora_rt.models.common import AdapterHook, base_linear, dense
from uora_rt.parallel.shard import ROW_GROUPS


def _rank_of(f) -> int:
    return 2 * f.lambda_d.shape[2] if f.with_q else f.lambda_d.shape[2]


class ShardedHook(AdapterHook):
    """adapters: the step's pool.AdapterBatch (None = base only); the hook is always present
    under tensor parallelism, since the row-parallel groups must reduce."""

    def __init__(self, rank: int, world: int, adapters=None, group=None):
        self.rank, self.world, self.group = rank, world, group
        self.families = list(adapters.families) if adapters is not None else []

    def run(self, layer, group, linear, x):
        if group in ROW_GROUPS:
            return self._row_parallel(layer, group, linear, x)
        y = base_linear(linear, x)
        x2d, y2d = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for f in self.families:
            args = f.groups.get((layer, group))
            if args is None:
                continue
            u = F.linear(x2d.to(f.a_cat.dtype), f.a_cat[:_rank_of(f), : x2d.shape[1]])
            for m, off, col, out in zip(*args):
                o = out // self.world
                ops.uora_expand_(y2d, u, f.b_cat[self.rank * o:], f.lambda_d, f.lambda_b, f.p,
                                 f.token_slots, [m], [off + self.rank * o], [col // self.world],
                                 [o], f.with_q)
        return y

    def _row_parallel(self, layer, group, linear, x):
        x2d = x.reshape(-1, x.shape[-1])                                     # [T, in / N]
        n, start = linear.weight.shape[0], self.rank * x2d.shape[1]
        used = [f for f in self.families if (layer, group) in f.groups]
        dtype = x.dtype
        for f in used:  # one buffer for the reduce: float32 when the factors are (CPU bf16)
            dtype = torch.promote_types(dtype, f.a_cat.dtype)
        parts = [dense(x2d, linear.weight).to(dtype)]                        # [T, n] partial
        for f in used:
            a = f.a_cat[:_rank_of(f), start:start + x2d.shape[1]]
            parts.append(F.linear(x2d.to(a.dtype), a).to(dtype))             # [T, R] partial
        buf = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        dist.all_reduce(buf, group=self.group)
        y = buf[:, :n]
        if linear.bias is not None:
            y += linear.bias
        col = n
        for f in used:
            r = _rank_of(f)
            ops.uora_expand_(y, buf[:, col:col + r], f.b_cat, f.lambda_d, f.lambda_b, f.p,
                             f.token_slots, *f.groups[(layer, group)], f.with_q)
            col += r
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
