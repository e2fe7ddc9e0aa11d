"""A projection family: every adapter that shares one set of frozen projections, and the tables
that hold their vectors on the host and on the device.

A family (algorithm, seed, r, max_in, max_out) owns its shared factors on the device,
A_cat = [A0; QA] and B_cat = [B0 | QB], built once, and two tiers of per-adapter vectors:
    host   (every registered adapter)   rows of host_d [N, M, r], host_b [N, NB], host_p [N, r]
    device (`slots` of them)            lambda_d [S, M, r], lambda_b [S, NB], p [S, r]
(M: the modules the family's adapters target; NB: the sum of their outs, packed.) The registry
fills the host tier, the device slots the device tier. Device tables keep their size and
identity (CUDA graphs that read them stay valid); only a new target module widens them, by
replacement, so a step already holding the old tensors stays consistent.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass

import torch

from uora_rt.core import format as fmt
from uora_rt.core.projections import ALGORITHM, projections, vera_projections
from uora_rt.kernels import triton_expand


def family_key(adapter: fmt.Adapter):
    spec = adapter.projection
    if spec.algorithm == fmt.EXPLICIT_ALGORITHM:  # each explicit adapter is its own family
        return (spec.algorithm, id(adapter))
    return (spec.algorithm, spec.seed, spec.r, spec.max_in, spec.max_out)


def family_factors(adapter: fmt.Adapter):
    """(A_cat, B_cat, has_q) float32 CPU: [A0; QA] and [B0 | QB] for UORA, plain A and B else."""
    spec = adapter.projection
    if spec.algorithm == ALGORITHM:
        a0, b0, qa, qb = projections(spec.seed, spec.r, spec.max_in, spec.max_out)
        return torch.cat([a0, qa]), torch.cat([b0, qb], dim=1), True
    if spec.algorithm == fmt.PEFT_VERA_ALGORITHM:
        a, b = vera_projections(spec.seed, spec.r, spec.max_in, spec.max_out)
        return a, b, False
    return adapter.explicit[0], adapter.explicit[1], False


def kv_identity(adapter: fmt.Adapter, targets: list[str]) -> bytes:
    """A digest (SHA-256) of everything in an adapter that changes what the model computes, so
    the keys/values it produces: its projection family (algorithm, seed, r, sizes, explicit
    matrices), P, and per adapted site (the base's module it resolves to) lambda_d and
    lambda_b, as bytes. Not the name, path or training metadata: two files with the same tensors
    are the same adapter to the KV cache, and a file retrained under an old name is not.
    targets: the site names of adapter.targets, in order (AdapterRegistry.check)."""
    h = hashlib.sha256(b"uora-kv-identity-v1\0")
    spec = adapter.projection

    def text(s: str) -> None:
        b = s.encode()
        h.update(len(b).to_bytes(8, "little") + b)

    def tensor(t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        text(f"{t.dtype}{list(t.shape)}")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())

    text(json.dumps([spec.algorithm, spec.seed, spec.r, spec.max_in, spec.max_out]))
    tensor(adapter.p)
    if adapter.explicit is not None:
        tensor(adapter.explicit[0])
        tensor(adapter.explicit[1])
    for site_name, t in sorted(zip(targets, adapter.targets)):
        text(site_name)
        tensor(adapter.lambda_d[t])
        tensor(adapter.lambda_b[t])
    return h.digest()


class Family:
    def __init__(self, fid: int, key, r: int, factors, slots: int, device, factor_dtype):
        a_cat, b_cat, has_q = factors
        # fid: never reused within a manager, and the same on every tensor-parallel rank (each
        # registers the same adapters in the same order): what step metadata and captured CUDA
        # graphs name a family by.
        self.fid, self.key, self.r, self.has_q = fid, key, r, has_q
        self.version = 0  # bumped whenever the device tables are replaced
        # float32 CPU factors for merging (exact); the device copies in the kernels' dtype.
        self.factors_f32 = (a_cat, b_cat)
        self.a_cat = a_cat.to(device, factor_dtype).contiguous()
        self.b_cat = b_cat.to(device, factor_dtype).contiguous()
        self.device = torch.device(device)
        self.modules: list[str] = []                 # module id -> site name
        self.lb_offset: dict[str, int] = {}
        self.groups: dict = {}                        # (layer, group) -> op arguments
        self.tables: dict = {}                        # (layer, group) -> (module table, max out)
        # host tier
        self.host_d = torch.zeros(0, 0, r)
        self.host_b = torch.zeros(0, 0)
        self.host_p = torch.ones(0, r)
        self.host_free: list[int] = []
        self.members = 0                              # registered entries (removed but leased too)
        # device tier
        self.lambda_d = torch.zeros(slots, 0, r, device=device)
        self.lambda_b = torch.zeros(slots, 0, device=device)
        self.p = torch.ones(slots, r, device=device)
        self.slot_entry: list[Entry | None] = [None] * slots
        self.pins = [0] * slots
        self.free_slots = list(range(slots - 1, -1, -1))
        self.lru: OrderedDict[int, None] = OrderedDict()  # resident, unpinned; oldest first

    @property
    def slots(self) -> int:
        return len(self.slot_entry)

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.a_cat, self.b_cat, self.lambda_d, self.lambda_b, self.p))

    def add_modules(self, targets: list[str], sites: dict) -> None:
        """Widens both tiers for target modules the family has not seen yet."""
        new = [t for t in dict.fromkeys(targets) if t not in self.lb_offset]
        if not new:
            return
        old_m, old_nb = len(self.modules), self.host_b.shape[1]
        nb = old_nb
        for t in new:
            self.lb_offset[t] = nb
            self.modules.append(t)
            nb += sites[t].out
        m = len(self.modules)

        def widen(old_d, old_b, n, device):
            d = torch.zeros(n, m, self.r, device=device)
            b = torch.zeros(n, nb, device=device)
            d[:, :old_m], b[:, :old_nb] = old_d, old_b
            return d, b

        self.host_d, self.host_b = widen(self.host_d, self.host_b, self.host_d.shape[0], "cpu")
        # New tensors: a step in flight keeps the old ones, which stay consistent.
        self.lambda_d, self.lambda_b = widen(self.lambda_d, self.lambda_b, self.slots,
                                             self.device)
        self.groups = self._group_table(sites)
        self.tables = {key: (triton_expand.module_table(*args, self.device), max(args[3]))
                       for key, args in self.groups.items()}
        self.version += 1

    def _group_table(self, sites: dict) -> dict:
        table: dict = {}
        for mid, name in enumerate(self.modules):
            s = sites[name]
            ids, offs, cols, outs = table.setdefault((s.layer, s.group), ([], [], [], []))
            ids.append(mid)
            offs.append(self.lb_offset[name])
            cols.append(s.col)
            outs.append(s.out)
        return table

    def new_host_row(self) -> int:
        if self.host_free:
            return self.host_free.pop()
        old = self.host_d.shape[0]
        cap = max(4, 2 * old)
        d = torch.zeros(cap, len(self.modules), self.r)
        b = torch.zeros(cap, self.host_b.shape[1])
        p = torch.ones(cap, self.r)
        d[:old], b[:old], p[:old] = self.host_d, self.host_b, self.host_p
        self.host_d, self.host_b, self.host_p = d, b, p
        self.host_free += list(range(cap - 1, old, -1))
        return old


@dataclass(eq=False)
class Entry:
    """One registered adapter: where its vectors live (host row, device slot) and who holds it."""

    name: str
    uid: int            # never reused; the same on every tensor-parallel rank
    family: Family
    row: int
    targets: list[str]  # site names
    has_q: bool         # p < 1 somewhere: the Q halves are needed
    source: str | None  # the file or folder it was read from
    created: float      # when it was registered (time.time())
    refs: int = 0       # leases: accepted requests (and synchronous batches) using it
    removed: bool = False
    slot: int = -1      # device slot, -1 = host only
    kv_identity: bytes = b""  # kv_identity(): what the prefix cache keys this adapter's KV by
