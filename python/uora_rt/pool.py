"""The adapter pool: projection families built once per key, slots that hold only vectors.

A family (algorithm, seed, r, max_in, max_out) owns the stacked factors A_cat = [A0; QA] and
B_cat = [B0 | QB] on the device and tables with one row per slot:
    lambda_d [slots, modules, r]   lambda_b [slots, sum of outs] (packed)   p [slots, r]
Tables are replaced, never resized in place, so a batch that took a snapshot (`AdapterBatch`)
keeps consistent tensors while adapters are added or removed; a removed adapter's slot is reused
only once no batch is in flight.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from uora_rt import format as fmt
from uora_rt import ops
from uora_rt.checkpoint import resolve_module
from uora_rt.errors import AdapterFormatError
from uora_rt.models.common import AdapterHook, Site
from uora_rt.projections import ALGORITHM, projections


def family_key(adapter: fmt.Adapter):
    spec = adapter.projection
    if spec.algorithm == fmt.EXPLICIT_ALGORITHM:  # each explicit adapter is its own family
        return (spec.algorithm, id(adapter))
    return (spec.algorithm, spec.seed, spec.r, spec.max_in, spec.max_out)


def family_factors(adapter: fmt.Adapter):
    """(A_cat, B_cat, has_q): [A0; QA] and [B0 | QB] for UORA, the plain A and B otherwise."""
    spec = adapter.projection
    if spec.algorithm == ALGORITHM:
        a0, b0, qa, qb = projections(spec.seed, spec.r, spec.max_in, spec.max_out)
        return torch.cat([a0, qa]), torch.cat([b0, qb], dim=1), True
    if spec.algorithm == fmt.PEFT_VERA_ALGORITHM:
        from uora_rt.projections import vera_projections

        a, b = vera_projections(spec.seed, spec.r, spec.max_in, spec.max_out)
        return a, b, False
    return adapter.explicit[0], adapter.explicit[1], False


@dataclass
class Family:
    key: tuple
    r: int
    a_cat: torch.Tensor
    b_cat: torch.Tensor
    has_q: bool
    modules: list[str] = field(default_factory=list)      # module id -> site name
    lb_offset: dict[str, int] = field(default_factory=dict)
    lambda_d: torch.Tensor | None = None
    lambda_b: torch.Tensor | None = None
    p: torch.Tensor | None = None
    slot_q: list[bool] = field(default_factory=list)       # slot has p < 1 somewhere
    free: list[int] = field(default_factory=list)
    groups: dict = field(default_factory=dict)             # (layer, group) -> op arguments
    ext: dict = field(default_factory=dict)                # (layer, group) -> fused weight, bias

    @property
    def capacity(self) -> int:
        return 0 if self.p is None else self.p.shape[0]


@dataclass
class Entry:
    name: str
    family: Family
    slot: int
    adapter: fmt.Adapter
    targets: list[str]  # site names


class AdapterPool:
    """fuse_shrink: compute the primary family's shrink inside each group's base GEMM (its weight
    with A_cat's rows appended, built lazily per group) instead of a separate pass over x. Worth it
    where GEMMs are memory-bound (GPU decode); on the CPU the base-only rows would pay for it."""

    def __init__(self, sites: list[Site], device, base_arch: str, group_linear=None,
                 fuse_shrink: bool = False, slots: int = 4, factor_dtype=torch.float32):
        self.sites = {s.name: s for s in sites}
        self.device = torch.device(device)
        self.base_arch = base_arch
        self.group_linear = group_linear
        self.fuse_shrink = fuse_shrink and group_linear is not None
        self.initial_slots = max(1, slots)
        # The shared factors in the dtype the kernels multiply in: bf16 on a bf16 GPU model
        # (tensor cores, half the bytes); float32 on the CPU. Vectors stay float32 everywhere.
        self.factor_dtype = factor_dtype
        self.families: dict[tuple, Family] = {}
        self.entries: dict[str, Entry] = {}
        self._lock = threading.RLock()
        self._in_flight = 0
        self._pending_free: list[tuple[Family, int]] = []

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

    # --- add / remove -----------------------------------------------------------------------
    def add(self, name: str, adapter: fmt.Adapter) -> None:
        source = adapter.path or name
        targets = self._resolve_targets(adapter, source)  # validate before touching anything
        with self._lock:
            if name in self.entries:
                raise ValueError(f"an adapter named {name!r} is already loaded")
            key = family_key(adapter)
            fam = self.families.get(key)
            if fam is None:
                a_cat, b_cat, has_q = family_factors(adapter)
                fam = Family(key, adapter.r, a_cat.to(self.device, self.factor_dtype).contiguous(),
                             b_cat.to(self.device, self.factor_dtype).contiguous(), has_q)
                self.families[key] = fam
            self._ensure_modules(fam, targets)
            slot = fam.free.pop() if fam.free else self._grow(fam)
            lam_d = torch.zeros(len(fam.modules), fam.r)
            lam_b = torch.zeros(fam.lambda_b.shape[1])
            for t, site_name in zip(adapter.targets, targets):
                lam_d[fam.modules.index(site_name)] = adapter.lambda_d[t]
                off = fam.lb_offset[site_name]
                lam_b[off:off + self.sites[site_name].out] = adapter.lambda_b[t]
            # The slot is free: no batch in flight reads it, so writing in place is safe.
            fam.lambda_d[slot] = lam_d.to(self.device)
            fam.lambda_b[slot] = lam_b.to(self.device)
            fam.p[slot] = adapter.p.to(self.device)
            fam.slot_q[slot] = bool((adapter.p < 1).any())
            self.entries[name] = Entry(name, fam, slot, adapter, targets)

    def remove(self, name: str) -> None:
        with self._lock:
            entry = self.entries.pop(name, None)
            if entry is None:
                raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.entries)}")
            self._pending_free.append((entry.family, entry.slot))
            self._release_pending()

    def _release_pending(self):
        if self._in_flight == 0:
            for fam, slot in self._pending_free:
                fam.free.append(slot)
            self._pending_free.clear()

    def _ensure_modules(self, fam: Family, targets: list[str]) -> None:
        new = [t for t in targets if t not in fam.lb_offset]
        if not new and fam.p is not None:
            return
        cap = max(fam.capacity, self.initial_slots)
        old_m, old_nb = len(fam.modules), 0 if fam.lambda_b is None else fam.lambda_b.shape[1]
        for t in new:
            fam.lb_offset[t] = old_nb + sum(self.sites[n].out for n in new[: new.index(t)])
            fam.modules.append(t)
        nb = old_nb + sum(self.sites[t].out for t in new)
        lambda_d = torch.zeros(cap, len(fam.modules), fam.r, device=self.device)
        lambda_b = torch.zeros(cap, nb, device=self.device)
        p = torch.ones(cap, fam.r, device=self.device)
        if fam.p is not None:  # copy into new tensors: in-flight batches keep the old ones
            lambda_d[:, :old_m] = fam.lambda_d
            lambda_b[:, :old_nb] = fam.lambda_b
            p.copy_(fam.p)
        else:
            fam.slot_q = [False] * cap
            fam.free = list(range(cap - 1, -1, -1))
        fam.lambda_d, fam.lambda_b, fam.p = lambda_d, lambda_b, p
        fam.groups = self._group_table(fam)

    def _grow(self, fam: Family) -> int:
        old = fam.capacity
        cap = old * 2
        fam.lambda_d = torch.cat([fam.lambda_d, torch.zeros_like(fam.lambda_d)])
        fam.lambda_b = torch.cat([fam.lambda_b, torch.zeros_like(fam.lambda_b)])
        fam.p = torch.cat([fam.p, torch.ones_like(fam.p)])
        fam.slot_q += [False] * (cap - old)
        fam.free += list(range(cap - 1, old, -1))
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

    # --- batches ----------------------------------------------------------------------------
    def batch(self, names: list[str | None], token_valid: torch.Tensor) -> "AdapterBatch | None":
        """A snapshot for one request: names per sequence, token_valid [B, L] (False = padding)."""
        with self._lock:
            unknown = [n for n in names if n is not None and n not in self.entries]
            if unknown:
                raise KeyError(f"unknown adapter(s) {unknown}; loaded: {sorted(self.entries)}")
            if all(n is None for n in names):
                return None
            self._in_flight += 1
            per_family: dict[tuple, list[int]] = {}
            for n in names:
                if n is not None:
                    e = self.entries[n]
                    per_family.setdefault(e.family.key, [-1] * len(names))
            for i, n in enumerate(names):
                if n is not None:
                    e = self.entries[n]
                    per_family[e.family.key][i] = e.slot
            views = []
            # Families in creation order: the pool's first family is the one fused into the
            # base GEMMs whenever it is present, so one set of fused weights serves every batch.
            for key in [k for k in self.families if k in per_family]:
                seq_slots = per_family[key]
                fam = self.families[key]
                used = {s for s in seq_slots if s >= 0}
                with_q = fam.has_q and any(fam.slot_q[s] for s in used)
                fused = self.fuse_shrink and key == next(iter(self.families))
                views.append(FamilyView(key, fam.a_cat, fam.b_cat, fam.lambda_d, fam.lambda_b, fam.p,
                                        dict(fam.groups), with_q,
                                        torch.tensor(seq_slots, dtype=torch.int32),
                                        fam if fused else None))
            return AdapterBatch(self, views, token_valid)

    def fused_weight(self, fam: Family, layer: int, group: str):
        """[W; A0; QA] (and the bias padded with zeros) for one group, built once per family."""
        key = (layer, group)
        hit = fam.ext.get(key)
        if hit is None:
            with self._lock:
                linear = self.group_linear(layer, group)
                w = linear.weight
                a = fam.a_cat[:, : w.shape[1]].to(w.dtype)
                b = None if linear.bias is None else torch.cat(
                    [linear.bias, linear.bias.new_zeros(a.shape[0])])
                hit = fam.ext.setdefault(key, (torch.cat([w, a]).contiguous(), b))
        return hit

    def clear_fused(self):
        """Base weights changed (merge/unmerge): fused weights must be rebuilt."""
        with self._lock:
            for fam in self.families.values():
                fam.ext.clear()

    def _finish(self):
        with self._lock:
            self._in_flight -= 1
            self._release_pending()


@dataclass
class FamilyView:
    key: tuple
    a_cat: torch.Tensor
    b_cat: torch.Tensor
    lambda_d: torch.Tensor
    lambda_b: torch.Tensor
    p: torch.Tensor
    groups: dict
    with_q: bool
    seq_slots: torch.Tensor  # [B] int32, -1 = not this family
    fused: Family | None = None  # set when this family's shrink runs inside the base GEMM


class AdapterBatch(AdapterHook):
    """The adapter hook of one request: per-token slots for the current step, per family."""

    def __init__(self, pool: AdapterPool, families: list[FamilyView], token_valid,
                 counted: bool = True):
        self.pool, self.families = pool, families
        self.set_step(token_valid)
        self.closed = not counted  # an uncounted hook never releases the pool's in-flight count

    def set_step(self, token_valid: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """token_valid: [B, L] of this forward step; rows: which sequences remain (decode)."""
        if rows is not None:
            for f in self.families:
                f.seq_slots = f.seq_slots.index_select(0, rows.cpu())
        self.token_slots = []
        for f in self.families:
            slots = f.seq_slots[:, None].expand(token_valid.shape).clone()
            slots[~token_valid.cpu()] = -1
            self.token_slots.append(slots.reshape(-1).to(token_valid.device))

    def run(self, layer, group, linear, x):
        first = self.families[0]
        if first.fused is None or (layer, group) not in first.groups:
            return super().run(layer, group, linear, x)
        # One GEMM gives [y | u]: the base output and the fused family's shrink, u = x A_cat^T.
        w_ext, b_ext = self.pool.fused_weight(first.fused, layer, group)
        n = linear.weight.shape[0]
        rank = 2 * first.lambda_d.shape[2] if first.with_q else first.lambda_d.shape[2]
        y_ext = torch.nn.functional.linear(x, w_ext[: n + rank],
                                           None if b_ext is None else b_ext[: n + rank])
        y_ext2d = y_ext.view(-1, n + rank)
        y2d, u2d = y_ext2d[:, :n], y_ext2d[:, n:]
        ids, offs, cols, outs = first.groups[(layer, group)]
        ops.uora_expand_(y2d, u2d, first.b_cat, first.lambda_d, first.lambda_b, first.p,
                         self.token_slots[0], ids, offs, cols, outs, first.with_q)
        self._apply_families(layer, group, x.reshape(-1, x.shape[-1]), y2d, skip_first=True)
        return y_ext[..., :n]

    def apply(self, layer, group, x2d, y2d):
        self._apply_families(layer, group, x2d, y2d)

    def _apply_families(self, layer, group, x2d, y2d, skip_first=False):
        for k, (f, slots) in enumerate(zip(self.families, self.token_slots)):
            args = f.groups.get((layer, group))
            if args is None or (skip_first and k == 0):
                continue
            ids, offs, cols, outs = args
            ops.uora_group_(y2d, x2d, f.a_cat, f.b_cat, f.lambda_d, f.lambda_b, f.p, slots, ids,
                            offs, cols, outs, f.with_q)

    def close(self):
        if not self.closed:
            self.closed = True
            self.pool._finish()
