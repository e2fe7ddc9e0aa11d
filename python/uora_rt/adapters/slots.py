"""Device slots: which registered adapters are resident on the device, in which slot of their
family's tables.

A running request *pins* its adapter's slot (a pinned slot is never evicted). Pinning an adapter
that is not resident uploads its vectors into a free slot, or into the least recently used
unpinned one (vLLM's max_loras, with an LRU). Nothing running reads a free or unpinned slot, so
writing it in place is safe, even under a captured CUDA graph that reads the tables.
"""

from __future__ import annotations

from uora_rt.adapters.family import Entry


class DeviceSlots:
    def __init__(self, on_upload=None):
        self.on_upload = on_upload  # (entry, slot) after each upload, for mirrors
        self.stats = {"uploads": 0, "evictions": 0}

    def pin(self, entry: Entry) -> bool:
        """Makes an adapter resident and keeps it so until unpin. False: every slot of its
        family is pinned (the caller waits for one to be released)."""
        fam, s = entry.family, entry.slot
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
        self.place(entry, s)
        fam.pins[s] = 1
        return True

    def place(self, entry: Entry, s: int) -> None:
        """Writes an adapter's host vectors into device slot s of its family (unpinned). The
        pin above chooses s; a tensor-parallel worker mirrors its driver's choice with it."""
        fam = entry.family
        old = fam.slot_entry[s]
        if old is not None and old is not entry:
            old.slot = -1
        if s in fam.free_slots:
            fam.free_slots.remove(s)
        fam.lambda_d[s].copy_(fam.host_d[entry.row])
        fam.lambda_b[s].copy_(fam.host_b[entry.row])
        fam.p[s].copy_(fam.host_p[entry.row])
        fam.slot_entry[s], entry.slot = entry, s
        self.stats["uploads"] += 1
        if self.on_upload is not None:
            self.on_upload(entry, s)

    def unpin(self, entry: Entry) -> None:
        fam, s = entry.family, entry.slot
        fam.pins[s] -= 1
        if fam.pins[s] == 0:
            fam.lru[s] = None  # most recently used

    def evict(self, entry: Entry) -> None:
        """Frees an unpinned entry's slot (the entry is being dropped)."""
        fam, s = entry.family, entry.slot
        if s < 0:
            return
        fam.lru.pop(s, None)
        fam.slot_entry[s] = None
        fam.free_slots.append(s)
        entry.slot = -1
