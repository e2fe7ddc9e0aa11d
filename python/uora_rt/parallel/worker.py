"""A tensor-parallel worker (ranks 1..N-1): `python -m uora_rt.parallel.worker --rank k ...`.

It loads its shard of the decoder and a pool that mirrors the driver's (same adapters, same
device slots, replayed from the driver's messages), then loops: receive a message, apply it or
run its shard of the forward, which takes part in the all-reduces. It exits on STOP, on any
error (with the traceback in its log: the driver's next collective then fails fast), or when
its parent process is gone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from uora_rt.core import format as fmt
from uora_rt.engine.attention import PagedAttention, choose_attention
from uora_rt.engine.kv_cache import KVPool
from uora_rt.models.common import PaddedAttention
from uora_rt.parallel import comm, shard
from uora_rt.parallel.driver import ATTENTION_PATHS, IDLE, backend_for
from uora_rt.parallel.hook import ShardedHook
from uora_rt.parallel.step import decode_step, split_adapters
from uora_rt.adapters.pool import AdapterPool
from uora_rt.runtime import pool_settings

log = logging.getLogger("uora_rt.parallel")


class Worker:
    def __init__(self, model, pool: AdapterPool, chan: comm.Channel, rank: int, world: int):
        self.model, self.pool, self.chan, self.rank, self.world = model, pool, chan, rank, world
        self.device, self.dtype = pool.device, model.embed.weight.dtype
        self.entries: dict = {}    # driver uid -> Entry (registered here as "#uid")
        self.families: dict = {}   # driver Family.serial -> this pool's Family
        self.kv: dict = {}         # kv id -> (KVPool, decode_fn, prefill_fn)
        self.handlers = {comm.ADD: self.add, comm.DROP: self.drop, comm.UPLOAD: self.upload,
                         comm.KV_OPEN: self.kv_open, comm.KV_CLOSE: self.kv_close,
                         comm.STEP: self.step, comm.FORWARD: self.forward}

    def loop(self) -> None:
        while True:
            op, ints, tensors = self.chan.recv()
            if op == comm.STOP:
                return
            self.handlers[op](ints, tensors)

    # --- the pool's mirror --------------------------------------------------------------------
    def add(self, ints, tensors) -> None:
        uid, serial = ints
        adapter = fmt.loads(tensors[0].cpu().numpy().tobytes(), comm.text(tensors[1]))
        self.pool.add(f"#{uid}", adapter)
        entry = self.entries[uid] = self.pool.entries[f"#{uid}"]
        self.families[serial] = entry.family

    def drop(self, ints, tensors) -> None:
        self.pool.remove(f"#{ints[0]}")  # never leased here: dropped at once, as on the driver
        del self.entries[ints[0]]
        live = set(map(id, self.pool.families.values()))
        self.families = {s: f for s, f in self.families.items() if id(f) in live}

    def upload(self, ints, tensors) -> None:
        uid, slot = ints
        self.pool._write_slot(self.entries[uid], slot)

    def _hook(self, slots: dict, with_q: dict) -> ShardedHook:
        fam_slots = {self.families[s]: t for s, t in slots.items()}
        fam_q = {self.families[s]: q for s, q in with_q.items()}
        adapters = self.pool.hook(fam_slots, fam_q) if fam_slots else None
        return ShardedHook(self.rank, self.world, adapters)

    # --- engines' KV caches and forwards ------------------------------------------------------
    def kv_open(self, ints, tensors) -> None:
        kv_id, num_blocks, block_size, path = ints
        decode_fn, prefill_fn, _ = choose_attention(self.device, ATTENTION_PATHS[path])
        self.kv[kv_id] = (KVPool(self.model.spec, num_blocks, block_size, self.dtype,
                                 self.device), decode_fn, prefill_fn)

    def kv_close(self, ints, tensors) -> None:
        self.kv.pop(ints[0], None)

    @torch.no_grad()
    def step(self, ints, tensors) -> None:
        kv_id, meta, slots, with_q = decode_step(ints, tensors, self.device)
        kv, decode_fn, prefill_fn = self.kv[kv_id]
        # Rows: none. The hidden state is replicated after the last all-reduce; rank 0 alone
        # computes the head and samples.
        self.model(meta.input_ids, meta.positions, PagedAttention(meta, kv, decode_fn, prefill_fn),
                   self._hook(slots, with_q), rows=meta.logits_rows)

    @torch.no_grad()
    def forward(self, ints, tensors) -> None:
        ids, positions, valid = tensors[:3]
        slots, with_q, _ = split_adapters(ints, tensors[3:])
        self.model(ids, positions, PaddedAttention(valid), self._hook(slots, with_q),
                   rows=torch.empty(0, dtype=torch.long, device=self.device))


def _watch_parent(parent: int) -> None:
    """Exit when the driver is gone (its sockets usually end us first; this covers the rest)."""
    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="uora_rt.parallel.worker")
    for name, kind in (("rank", int), ("world", int), ("port", int), ("base", str),
                       ("device", str), ("dtype", str), ("slots", int), ("timeout", float),
                       ("start-timeout", float), ("parent", int)):
        p.add_argument(f"--{name}", type=kind, required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"worker {a.rank}: %(levelname)s %(message)s")
    _watch_parent(a.parent)
    device = torch.device(a.device) if a.device == "cpu" else torch.device("cuda", a.rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif "OMP_NUM_THREADS" not in os.environ:  # the ranks share the host's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // a.world))
    dtype = getattr(torch, a.dtype)
    store = dist.TCPStore("127.0.0.1", a.port, a.world, is_master=False,
                          timeout=timedelta(seconds=a.start_timeout))
    config, _ = shard.read_spec(a.base)
    model = shard.load_shard(a.base, a.rank, a.world, device, dtype)
    arch, factor_dtype = pool_settings(config, device, dtype)
    pool = AdapterPool(shard.full_sites(config), device, arch, False, a.slots, factor_dtype)
    store.set(f"tp_ready_{a.rank}", "1")
    timeout = timedelta(seconds=a.timeout)
    dist.init_process_group(backend_for(device), store=store, rank=a.rank, world_size=a.world,
                            timeout=timeout)
    worker = Worker(model, pool, comm.Channel(dist.new_group(timeout=IDLE), device), a.rank,
                    a.world)
    try:
        worker.loop()
    except Exception:
        log.exception("tensor-parallel worker %d failed", a.rank)
        logging.shutdown()
        os._exit(1)  # no clean-up collectives: the driver learns from the closed sockets
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
