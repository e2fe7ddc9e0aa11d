"""AdapterManager: the runtime's and the engine's one handle on serving-side adapters.

It puts the registry (names, host vectors, leases), the device slots (resident adapters, pins)
and the per-step adapter batch together under one lock, so that adapters may be added and
removed from any thread while a step runs. It also holds the two rules that decide whether a
request's adapter can be served at all: an adapter merged into the weights (then every sequence
must use it), and the count of requests in flight (the weights may only change when none is).

With record_changes(), every registration, device-slot upload and final drop is also kept, in
order, for a mirror: a tensor-parallel worker replays them (add, place, remove) and so holds the
same families, modules and slots as its driver.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from uora_rt.adapters.batch import AdapterBatch, FamilyView
from uora_rt.adapters.family import Entry, Family
from uora_rt.adapters.registry import AdapterRegistry
from uora_rt.adapters.slots import DeviceSlots
from uora_rt.core import format as fmt
from uora_rt.kernels.routes import Routes
from uora_rt.models.common import Shard, Site


def factor_dtype_for(device, dtype) -> torch.dtype:
    """The dtype the shared factors are multiplied in: the model's on a GPU (tensor cores, half
    the bytes), float32 on the CPU. Vectors stay float32 everywhere."""
    return dtype if torch.device(device).type == "cuda" else torch.float32


class AdapterManager:
    """sites: the base model's adaptable modules (full shapes, also under tensor parallelism);
    slots: device slots per projection family (how many distinct adapters of a family can run
    at once); shard: this rank's part of a tensor-parallel model, None on one device."""

    def __init__(self, sites: list[Site], device, base_arch: str, slots: int = 64,
                 factor_dtype=torch.float32, shard: Shard | None = None):
        if slots < 1:
            raise ValueError(f"slots: expected >= 1, got {slots}")
        self.sites = {s.name: s for s in sites}
        self.device, self.base_arch, self.slots = torch.device(device), base_arch, slots
        self.factor_dtype, self.shard = factor_dtype, shard
        self.registry = AdapterRegistry(self.sites, self.device, slots, factor_dtype)
        self.device_slots = DeviceSlots(on_upload=self._uploaded)
        self.merged: str | None = None
        self._in_flight = 0
        self._changing: str | None = None  # "merge" / "unmerge" while the weights change
        self._changes: list[tuple] | None = None
        self._side: dict = {}  # CUDA device -> the side stream of the adapter kernels
        self._lock = threading.RLock()

    # --- what is loaded ---------------------------------------------------------------------
    @property
    def entries(self) -> dict[str, Entry]:
        return self.registry.entries

    @property
    def families(self) -> dict[tuple, Family]:
        return self.registry.families

    @property
    def stats(self) -> dict:
        return self.device_slots.stats

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self.registry.entries)

    def __contains__(self, name) -> bool:
        return name in self.registry.entries

    def vectors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """site name -> (lambda_d [r], lambda_b [out]) of a registered adapter (CPU copies)."""
        with self._lock:
            return self.registry.vectors(self.registry.entries[name])

    def device_bytes(self) -> int:
        """Device memory of every family's factors and slot tables: all that adapters add."""
        with self._lock:
            return sum(f.device_bytes() for f in self.registry.families.values())

    # --- registration -----------------------------------------------------------------------
    def add(self, name: str, adapter: fmt.Adapter, source=None) -> Entry:
        """Registers an adapter (host memory only; it reaches the device when a request runs).
        Validated before anything changes: a failure registers nothing."""
        source = source or adapter.path or name
        targets = self.registry.check(adapter, source)
        with self._lock:
            entry = self.registry.add(name, adapter, targets, source)
            if self._changes is not None:
                self._changes.append(("add", entry, adapter))
            return entry

    def remove(self, name: str) -> None:
        """New requests for `name` fail at once; requests holding it finish with it, and its
        slot and host row return when the last of them ends."""
        with self._lock:
            if name == self.merged:
                raise ValueError(f"{name!r} is merged into the weights: unmerge() first")
            entry = self.registry.unname(name)
            if entry.refs == 0:
                self._drop(entry)

    def _drop(self, entry: Entry) -> None:
        self.device_slots.evict(entry)  # refs == 0, so nothing pins it
        self.registry.drop(entry)
        if self._changes is not None:
            self._changes.append(("drop", entry))

    # --- leases and device slots ------------------------------------------------------------
    def lease(self, name: str) -> Entry:
        """The adapter a request will use (KeyError if unknown), held until release()."""
        with self._lock:
            entry = self.registry.lookup(name)
            entry.refs += 1
            return entry

    def release(self, entry: Entry) -> None:
        with self._lock:
            entry.refs -= 1
            if entry.removed and entry.refs == 0:
                self._drop(entry)

    def pin(self, entry: Entry) -> bool:
        """Makes a leased adapter resident until unpin; False when every slot of its family is
        pinned (the caller waits for one to be released)."""
        with self._lock:
            return self.device_slots.pin(entry)

    def unpin(self, entry: Entry) -> None:
        with self._lock:
            self.device_slots.unpin(entry)

    def place(self, entry: Entry, slot: int) -> None:
        """Puts a registered adapter into a given device slot (a mirror follows its driver)."""
        with self._lock:
            self.device_slots.place(entry, slot)

    def _uploaded(self, entry: Entry, slot: int) -> None:
        if self._changes is not None:
            self._changes.append(("upload", entry, slot))

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

    # --- the rules of what can be served ------------------------------------------------------
    def admit(self, names, count: int = 1) -> str | None:
        """Counts `count` requests for adapters `names` as being served, in one step with the
        rules that keep the base weights fixed under them: refused while an adapter is being
        merged or unmerged, and, while one is merged, for any other adapter. Returns the merged
        adapter's name (None: serve through the adapter slots). exit() ends each request."""
        with self._lock:
            if self._changing:
                raise ValueError(f"the base weights are being {self._changing}d: send the "
                                 f"request again once {self._changing}() has returned")
            if self.merged is not None and any(n != self.merged for n in names):
                raise ValueError(f"the runtime is merged with {self.merged!r}: every sequence "
                                 f"must use it (unmerge() to serve others)")
            self._in_flight += count
            return self.merged

    def exit(self, count: int = 1) -> None:
        with self._lock:
            self._in_flight -= count

    @contextmanager
    def changing_weights(self, what: str):
        """Held while merge/unmerge folds an adapter into the base weights: refused while any
        request is being served, and no request is admitted until it ends."""
        with self._lock:
            if self._in_flight:
                raise ValueError(f"{what}: {self._in_flight} request(s) are being served; the "
                                 f"weights can only change when none is")
            if self._changing:
                raise ValueError(f"{what}: the base weights are being {self._changing}d already")
            self._changing = what
        try:
            yield
        finally:
            with self._lock:
                self._changing = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # --- mirrors ------------------------------------------------------------------------------
    def record_changes(self) -> None:
        with self._lock:
            self._changes = []

    # --- per-step batches ---------------------------------------------------------------------
    def batch(self, token_slots: dict[int, torch.Tensor], with_q: dict[int, bool],
              routes: Routes, changes: list | None = None) -> AdapterBatch | None:
        """The adapter hook of one forward: per family id, each token's slot ([T] int32 on the
        device, -1 = not this family; every slot named must be pinned, or placed on a mirror)
        and whether any of those adapters has reinit events (else the Q halves are skipped).
        changes: a list that receives the recorded changes, taken in the same locked moment as
        the batch (so a mirror that replays them builds the same batch)."""
        with self._lock:
            if changes is not None and self._changes:
                changes.extend(self._changes)
                self._changes.clear()
            views = [FamilyView(f.a_cat, f.b_cat, f.lambda_d, f.lambda_b, f.p, f.groups,
                                f.tables, f.has_q and with_q.get(f.fid, False),
                                token_slots[f.fid])
                     for f in self.registry.families.values() if f.fid in token_slots]
            if not views:
                return None
            side = self._side_stream() if routes.side_stream else None
            return AdapterBatch(views, routes, side)

    def _side_stream(self):
        s = self._side.get(self.device)
        if s is None:
            s = self._side[self.device] = torch.cuda.Stream(self.device)
        return s

    def family_of(self, fid: int) -> Family | None:
        return next((f for f in self.registry.families.values() if f.fid == fid), None)
