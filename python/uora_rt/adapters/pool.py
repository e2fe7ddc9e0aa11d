"""The adapter pool: every registered adapter in host memory, a bounded set of them on the device.

A projection family (algorithm, seed, r, max_in, max_out) owns its shared factors on the device,
A_cat = [A0; QA] and B_cat = [B0 | QB], built once, and two tiers of per-adapter vectors:
    host   (every registered adapter)   rows of host_d [N, M, r], host_b [N, NB], host_p [N, r]
    device (`slots` of them)            lambda_d [S, M, r], lambda_b [S, NB], p [S, r]
(M: the modules the family's adapters target; NB: the sum of their outs, packed.)

Lifetimes: a request *leases* its adapter when it is accepted (remove_adapter then lets it
finish and refuses new requests) and *pins* the adapter's device slot while it runs (a pinned
slot is never evicted). Pinning an adapter that is not resident uploads its vectors into a free
slot, or into the least recently used unpinned one. Device tables keep their size and identity
(CUDA graphs that read them stay valid); only a new target module widens them, by replacement,
so a step already holding the old tensors stays consistent. A family whose last adapter is gone
releases its device tensors.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from uora_rt.core import format as fmt
from uora_rt.kernels import ops, triton_expand
from uora_rt.models.checkpoint import resolve_module
from uora_rt.errors import AdapterFormatError
from uora_rt.models.common import AdapterHook, Site, base_linear
from uora_rt.core.projections import ALGORITHM, projections


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
        from uora_rt.core.projections import vera_projections

        a, b = vera_projections(spec.seed, spec.r, spec.max_in, spec.max_out)
        return a, b, False
    return adapter.explicit[0], adapter.explicit[1], False


class Family:
    _serials = itertools.count()

    def __init__(self, key, r: int, factors, slots: int, device, factor_dtype):
        a_cat, b_cat, has_q = factors
        self.key, self.r, self.has_q = key, r, has_q
        # Never reused (unlike id()): what a captured CUDA graph was built against.
        self.serial = next(Family._serials)
        self.version = 0  # bumped whenever the device tables are replaced
        # float32 CPU factors for merging (exact); the device copies in the kernels' dtype.
        self.factors_f32 = (a_cat, b_cat)
        self.a_cat = a_cat.to(device, factor_dtype).contiguous()
        self.b_cat = b_cat.to(device, factor_dtype).contiguous()
        self.modules: list[str] = []                 # module id -> site name
        self.lb_offset: dict[str, int] = {}
        self.host_d = torch.zeros(0, 0, r)
        self.host_b = torch.zeros(0, 0)
        self.host_p = torch.ones(0, r)
        self.host_free: list[int] = []
        self.lambda_d = torch.zeros(slots, 0, r, device=device)
        self.lambda_b = torch.zeros(slots, 0, device=device)
        self.p = torch.ones(slots, r, device=device)
        self.slot_entry: list[Entry | None] = [None] * slots
        self.pins = [0] * slots
        self.free_slots = list(range(slots - 1, -1, -1))
        self.lru: OrderedDict[int, None] = OrderedDict()  # resident, unpinned; oldest first
        self.members = 0                              # registered entries (removed but leased too)
        self.groups: dict = {}                        # (layer, group) -> op arguments
        self.tables: dict = {}                        # (layer, group) -> (module table, max out)

    @property
    def slots(self) -> int:
        return len(self.slot_entry)

    def device_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.a_cat, self.b_cat, self.lambda_d, self.lambda_b, self.p))


@dataclass(eq=False)
class Entry:
    """One registered adapter: where its vectors live (host row, device slot) and who holds it."""

    name: str
    family: Family
    row: int
    targets: list[str]  # site names
    has_q: bool         # p < 1 somewhere: the Q halves are needed
    path: str | None
    refs: int = 0       # leases: accepted requests (and synchronous batches) using it
    removed: bool = False
    slot: int = -1      # device slot, -1 = host only


class AdapterPool:
    """slots: device slots per projection family (how many distinct adapters of a family can run
    at once; vLLM's max_loras). parallel_shrink: each family's shrink u = x A_cat^T is its own
    GEMM over every row, issued beside the base GEMM (on CUDA on a side stream, a parallel branch
    of a captured graph), then uora_expand_; off, uora_group_ shrinks only the rows that have an
    adapter, after the base GEMM (the CPU's choice: it is compute-bound). Either way the base
    weights are never copied: the shrink reads the family's one A_cat."""

    def __init__(self, sites: list[Site], device, base_arch: str, parallel_shrink: bool = False,
                 slots: int = 64, factor_dtype=torch.float32):
        if slots < 1:
            raise ValueError(f"slots: expected >= 1, got {slots}")
        self.sites = {s.name: s for s in sites}
        self.device = torch.device(device)
        self.base_arch = base_arch
        self.parallel_shrink = parallel_shrink
        # The decode expand of the parallel route in Triton where it runs (triton_expand.runs);
        # False: always the C++ op (benchmarks compare the two).
        self.triton_expand = True
        # With the fused decoder kernels, compute the decode expand on the side stream too and
        # let the consumer kernel add it (AdapterBatch.run_deferred); False: expand in place
        # after the base GEMM (benchmarks compare the two).
        self.defer_expand = True
        self._side: dict = {}  # CUDA device -> the side stream of the parallel shrink
        self.slots = slots
        # The shared factors in the dtype the kernels multiply in: bf16 on a bf16 GPU model
        # (tensor cores, half the bytes); float32 on the CPU. Vectors stay float32 everywhere.
        self.factor_dtype = factor_dtype
        self.families: dict[tuple, Family] = {}
        self.entries: dict[str, Entry] = {}
        self.stats = {"uploads": 0, "evictions": 0}
        self._lock = threading.RLock()

    # --- validation -------------------------------------------------------------------------
    def _resolve_targets(self, adapter: fmt.Adapter, source) -> list[str]:
        names = []
        for t in adapter.targets:
            site_name = resolve_module(t, self.sites, source)
            site = self.sites[site_name]
            want = list(adapter.base["modules"][t])
            if want != [site.out, site.inp]:
                raise AdapterFormatError(source, f"__metadata__.base.modules.{t}",
                                         f"the base model's [out, in] = [{site.out}, {site.inp}]",
                                         want)
            names.append(site_name)
        return names

    # --- registration -----------------------------------------------------------------------
    def add(self, name: str, adapter: fmt.Adapter) -> None:
        """Registers an adapter (host memory only; it reaches the device when a request runs)."""
        source = adapter.path or name
        targets = self._resolve_targets(adapter, source)  # validate before touching anything
        with self._lock:
            if name in self.entries:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            key = family_key(adapter)
            fam = self.families.get(key)
            if fam is None:
                fam = Family(key, adapter.r, family_factors(adapter), self.slots, self.device,
                             self.factor_dtype)
                self.families[key] = fam
            self._ensure_modules(fam, targets)
            row = fam.host_free.pop() if fam.host_free else self._grow_host(fam)
            fam.host_d[row].zero_()
            fam.host_b[row].zero_()
            for t, site_name in zip(adapter.targets, targets):
                fam.host_d[row, fam.modules.index(site_name)] = adapter.lambda_d[t]
                off = fam.lb_offset[site_name]
                fam.host_b[row, off:off + self.sites[site_name].out] = adapter.lambda_b[t]
            fam.host_p[row] = adapter.p
            fam.members += 1
            self.entries[name] = Entry(name, fam, row, targets, bool((adapter.p < 1).any()),
                                       adapter.path)

    def remove(self, name: str) -> None:
        """Unregisters an adapter: new requests for it fail at once; those holding it finish."""
        with self._lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.entries)}")
            entry.removed = True
            if entry.refs == 0:
                self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        fam = entry.family
        if entry.slot >= 0:  # refs == 0, so nothing pins it
            fam.lru.pop(entry.slot, None)
            fam.slot_entry[entry.slot] = None
            fam.free_slots.append(entry.slot)
            entry.slot = -1
        fam.host_free.append(entry.row)
        fam.members -= 1
        if fam.members == 0:  # the family's factors and tables go with it
            del self.families[fam.key]

    def _ensure_modules(self, fam: Family, targets: list[str]) -> None:
        new = [t for t in dict.fromkeys(targets) if t not in fam.lb_offset]
        if not new:
            return
        old_m, old_nb = len(fam.modules), fam.host_b.shape[1]
        nb = old_nb
        for t in new:
            fam.lb_offset[t] = nb
            fam.modules.append(t)
            nb += self.sites[t].out
        m, rows = len(fam.modules), fam.host_d.shape[0]

        def widen(old_d, old_b, n, device):
            d = torch.zeros(n, m, fam.r, device=device)
            b = torch.zeros(n, nb, device=device)
            d[:, :old_m], b[:, :old_nb] = old_d, old_b
            return d, b

        fam.host_d, fam.host_b = widen(fam.host_d, fam.host_b, rows, "cpu")
        # New tensors: a step in flight keeps the old ones, which stay consistent.
        fam.lambda_d, fam.lambda_b = widen(fam.lambda_d, fam.lambda_b, fam.slots, self.device)
        fam.groups = self._group_table(fam)
        fam.tables = {key: (triton_expand.module_table(*args, self.device), max(args[3]))
                      for key, args in fam.groups.items()}
        fam.version += 1

    def _grow_host(self, fam: Family) -> int:
        old = fam.host_d.shape[0]
        cap = max(4, 2 * old)
        d = torch.zeros(cap, len(fam.modules), fam.r)
        b = torch.zeros(cap, fam.host_b.shape[1])
        p = torch.ones(cap, fam.r)
        d[:old], b[:old], p[:old] = fam.host_d, fam.host_b, fam.host_p
        fam.host_d, fam.host_b, fam.host_p = d, b, p
        fam.host_free += list(range(cap - 1, old, -1))
        return old

    def _group_table(self, fam: Family) -> dict:
        table: dict = {}
        for mid, name in enumerate(fam.modules):
            s = self.sites[name]
            ids, offs, cols, outs = table.setdefault((s.layer, s.group), ([], [], [], []))
            ids.append(mid)
            offs.append(fam.lb_offset[name])
            cols.append(s.col)
            outs.append(s.out)
        return table

    def vectors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """site name -> (lambda_d [r], lambda_b [out]) of a registered adapter (CPU copies)."""
        with self._lock:
            e = self.entries[name]
            fam = e.family
            return {t: (fam.host_d[e.row, fam.modules.index(t)].clone(),
                        fam.host_b[e.row, fam.lb_offset[t]:fam.lb_offset[t] + self.sites[t].out]
                        .clone()) for t in e.targets}

    # --- leases and device slots ------------------------------------------------------------
    def lease(self, name: str) -> Entry:
        with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                raise KeyError(f"unknown adapter {name!r}; loaded: {sorted(self.entries)}")
            entry.refs += 1
            return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.removed and entry.refs == 0:
                self._drop(entry)

    def pin(self, entry: Entry) -> bool:
        """Makes a leased adapter resident and keeps it so until unpin. False: every slot of its
        family is pinned (the caller waits for one to be released)."""
        with self._lock:
            fam = entry.family
            s = entry.slot
            if s >= 0:
                if fam.pins[s] == 0:
                    fam.lru.pop(s)
                fam.pins[s] += 1
                return True
            if fam.free_slots:
                s = fam.free_slots.pop()
            elif fam.lru:
                s, _ = fam.lru.popitem(last=False)
                fam.slot_entry[s].slot = -1
                self.stats["evictions"] += 1
            else:
                return False
            # Nothing running reads slot s (it was free or unpinned): writing in place is safe.
            self._write_slot(entry, s)
            fam.slot_entry[s], entry.slot, fam.pins[s] = entry, s, 1
            self.stats["uploads"] += 1
            return True

    def _write_slot(self, entry: Entry, s: int) -> None:
        """Copies a registered adapter's host vectors into device slot s of its family."""
        fam = entry.family
        fam.lambda_d[s].copy_(fam.host_d[entry.row])
        fam.lambda_b[s].copy_(fam.host_b[entry.row])
        fam.p[s].copy_(fam.host_p[entry.row])

    def unpin(self, entry: Entry) -> None:
        with self._lock:
            fam, s = entry.family, entry.slot
            fam.pins[s] -= 1
            if fam.pins[s] == 0:
                fam.lru[s] = None  # most recently used

    @contextmanager
    def serving(self, names: list[str | None]):
        """Leases and pins every distinct adapter of a synchronous batch for its duration;
        yields {name: Entry}."""
        held: dict[str, Entry] = {}
        pinned: list[Entry] = []
        try:
            for n in dict.fromkeys(n for n in names if n is not None):
                held[n] = self.lease(n)
            for e in held.values():
                if not self.pin(e):
                    raise ValueError(f"this batch uses more distinct adapters of one projection "
                                     f"family than its {e.family.slots} device slots")
                pinned.append(e)
            yield held
        finally:
            for e in pinned:
                self.unpin(e)
            for e in held.values():
                self.release(e)

    def side_stream(self, device) -> torch.cuda.Stream:
        s = self._side.get(device)
        if s is None:
            s = self._side[device] = torch.cuda.Stream(device)
        return s

    def device_bytes(self) -> int:
        """Device memory of every family's factors and slot tables: all that adapters add."""
        with self._lock:
            return sum(f.device_bytes() for f in self.families.values())

    # --- per-step hooks ---------------------------------------------------------------------
    def hook(self, token_slots: dict[Family, torch.Tensor],
             with_q: dict[Family, bool]) -> "AdapterBatch | None":
        """The adapter hook of one forward: per family, each token's slot ([T] int32 on the
        device, -1 = not this family; every slot named must be pinned) and whether any of those
        adapters has reinit events (else the Q halves are skipped)."""
        with self._lock:
            views = [FamilyView(fam.a_cat, fam.b_cat, fam.lambda_d, fam.lambda_b, fam.p,
                                fam.groups, fam.tables, fam.has_q and with_q.get(fam, False),
                                slots)
                     for fam, slots in ((f, token_slots.get(f)) for f in self.families.values())
                     if slots is not None]
            return AdapterBatch(self, views) if views else None


def _shrink(f: "FamilyView", x2d: torch.Tensor, u: torch.Tensor) -> None:
    """u = x A_cat[:rank, :in]^T, from the family's one A_cat (in x's dtype)."""
    a = f.a_cat[: f.rank, : x2d.shape[1]]
    torch.mm(x2d, (a if a.dtype == x2d.dtype else a.to(x2d.dtype)).t(), out=u)


@dataclass
class FamilyView:
    """What one forward reads of a family (tensors captured when the step was built)."""

    a_cat: torch.Tensor
    b_cat: torch.Tensor
    lambda_d: torch.Tensor
    lambda_b: torch.Tensor
    p: torch.Tensor
    groups: dict
    tables: dict  # (layer, group) -> (triton_expand.module_table, max out)
    with_q: bool
    token_slots: torch.Tensor  # [T] int32, -1 = not this family

    @property
    def rank(self) -> int:
        """Columns of u this family's expand reads: [A0 x | QA x], or A0 x alone without Q."""
        return self.lambda_d.shape[2] * (2 if self.with_q else 1)


# Up to this many rows the decode expand is deferred (AdapterBatch.run_deferred). H200, 7B, 64
# adapters (bench/results/decode_gpu_deferred.json): at batch 1 deferred +2.2 % over no
# adapters against +3.4 % in place; at batch 64 +4.0 % against +2.8 % (the float32 delta's
# traffic and the side stream's longer branch outweigh the saved launch). 16 lies between the
# two measured points and was not measured itself.
DEFER_MAX_ROWS = 16


class AdapterBatch(AdapterHook):
    """The adapter hook of one forward: per family, per-token slots."""

    def __init__(self, pool: AdapterPool, families: list[FamilyView]):
        self.pool, self.families = pool, families

    def run(self, layer, group, linear, x):
        if not self.pool.parallel_shrink:
            return super().run(layer, group, linear, x)  # base GEMM, then uora_group_
        fams = [f for f in self.families if (layer, group) in f.groups]
        if not fams:
            return base_linear(linear, x)
        x2d = x.reshape(-1, x.shape[-1])
        # u is allocated on the current stream, which frees it after the expands.
        us = [x2d.new_empty(x2d.shape[0], f.rank) for f in fams]

        def shrink():
            for f, u in zip(fams, us):
                _shrink(f, x2d, u)

        y = self._beside(linear, x, shrink)
        y2d = y.view(-1, y.shape[-1])
        for f, u in zip(fams, us):
            if self.pool.triton_expand and triton_expand.runs(y2d, f.b_cat):
                table, max_out = f.tables[(layer, group)]
                triton_expand.expand_(y2d, u, f.b_cat, f.lambda_d, f.lambda_b, f.p,
                                      f.token_slots, table, max_out, f.with_q)
                continue
            ids, offs, cols, outs = f.groups[(layer, group)]
            ops.uora_expand_(y2d, u, f.b_cat, f.lambda_d, f.lambda_b, f.p, f.token_slots, ids,
                             offs, cols, outs, f.with_q)
        return y

    def run_deferred(self, layer, group, linear, x):
        """(y, extra) for the fused decoder kernels (models.fused.Kernels.group): the base GEMM
        on the current stream while the side stream computes every family's shrink and Triton
        expand into extra, a float32 [..., n_out] delta (zero where no adapter applies) that the
        consumer kernel adds as it reads y. So the adapter work leaves the critical path. Takes
        small decode batches (DEFER_MAX_ROWS) on CUDA, where parallel_shrink and defer_expand
        are on; elsewhere it is run(...) with nothing pending."""
        fams = [f for f in self.families if (layer, group) in f.groups]
        x2d = x.reshape(-1, x.shape[-1])
        if not fams:
            return base_linear(linear, x), None
        if not (self.pool.parallel_shrink and self.pool.defer_expand and self.pool.triton_expand
                and triton_expand.available() and x2d.shape[0] <= DEFER_MAX_ROWS
                and x.dtype in (torch.bfloat16, torch.float16)
                and all(f.b_cat.dtype == x.dtype for f in fams)):
            return self.run(layer, group, linear, x), None
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
        pool's side stream, which the current one forks to and joins before returning (in a
        captured graph, a parallel branch); elsewhere (CPU, Triton's interpreter) in order."""
        if not x.is_cuda:
            work()
            return base_linear(linear, x)
        main, side = torch.cuda.current_stream(x.device), self.pool.side_stream(x.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            work()
        y = base_linear(linear, x)
        main.wait_stream(side)
        return y

    def apply(self, layer, group, x2d, y2d):
        for f in self.families:
            args = f.groups.get((layer, group))
            if args is not None:
                ids, offs, cols, outs = args
                ops.uora_group_(y2d, x2d, f.a_cat, f.b_cat, f.lambda_d, f.lambda_b, f.p,
                                f.token_slots, ids, offs, cols, outs, f.with_q)
