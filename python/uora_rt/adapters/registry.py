"""The registry: every loaded adapter by name, validated against the base, its vectors in host
memory, and the leases of the requests that use it.

A request leases its adapter when it is accepted; remove() then refuses new requests for the
name at once and lets the leaseholders finish; the entry (and, with its last member, its family)
goes when the last lease is released. Names can be reused right after a removal: the old entry
lives on, nameless, until its leases end.
"""

from __future__ import annotations

import itertools
import time

from uora_rt.adapters.family import Entry, Family, family_factors, family_key, kv_identity
from uora_rt.core import format as fmt
from uora_rt.errors import AdapterFormatError
from uora_rt.models.checkpoint import resolve_module


class AdapterRegistry:
    def __init__(self, sites: dict, device, slots: int, factor_dtype):
        self.sites, self.device, self.slots, self.factor_dtype = sites, device, slots, factor_dtype
        self.families: dict[tuple, Family] = {}
        self.entries: dict[str, Entry] = {}
        self._fids, self._uids = itertools.count(), itertools.count()

    def check(self, adapter: fmt.Adapter, source) -> list[str]:
        """The site names of an adapter's targets; AdapterFormatError if it does not fit."""
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

    def add(self, name: str, adapter: fmt.Adapter, targets: list[str], source) -> Entry:
        """Registers a checked adapter (targets from check()); the caller holds the lock."""
        if name in self.entries:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        identity = kv_identity(adapter, targets)  # before any change: it reads every tensor
        key = family_key(adapter)
        fam = self.families.get(key)
        if fam is None:
            fam = Family(next(self._fids), key, adapter.r, family_factors(adapter), self.slots,
                         self.device, self.factor_dtype)
            self.families[key] = fam
        fam.add_modules(targets, self.sites)
        row = fam.new_host_row()
        fam.host_d[row].zero_()
        fam.host_b[row].zero_()
        for t, site_name in zip(adapter.targets, targets):
            fam.host_d[row, fam.modules.index(site_name)] = adapter.lambda_d[t]
            off = fam.lb_offset[site_name]
            fam.host_b[row, off:off + self.sites[site_name].out] = adapter.lambda_b[t]
        fam.host_p[row] = adapter.p
        fam.members += 1
        entry = Entry(name, next(self._uids), fam, row, targets, bool((adapter.p < 1).any()),
                      None if source is None else str(source), time.time(),
                      kv_identity=identity)
        self.entries[name] = entry
        return entry

    def lookup(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is None:
            raise KeyError(f"unknown adapter {name!r}; loaded: {sorted(self.entries)}")
        return entry

    def unname(self, name: str) -> Entry:
        """Takes a name out: new requests for it fail from now on."""
        entry = self.entries.pop(name, None)
        if entry is None:
            raise KeyError(f"no adapter named {name!r}; loaded: {sorted(self.entries)}")
        entry.removed = True
        return entry

    def drop(self, entry: Entry) -> None:
        """Frees a removed entry's host row (its device slot must be free already); the family
        goes with its last member."""
        fam = entry.family
        fam.host_free.append(entry.row)
        fam.members -= 1
        if fam.members == 0:  # the family's factors and tables go with it
            del self.families[fam.key]

    def vectors(self, entry: Entry) -> dict:
        """site name -> (lambda_d [r], lambda_b [out]) of an entry (CPU copies)."""
        fam = entry.family
        return {t: (fam.host_d[entry.row, fam.modules.index(t)].clone(),
                    fam.host_b[entry.row, fam.lb_offset[t]:fam.lb_offset[t] + self.sites[t].out]
                    .clone()) for t in entry.targets}
