"""A tensor-parallel worker (ranks 1..N-1): `python -m uora_rt.parallel.worker --rank k ...`.

It loads its shard of the decoder and an adapter manager that mirrors the driver's (the same
adapters, families and device slots, replayed from the driver's messages), then loops: receive a
message, apply it, or run its shard of a forward through the same code as the driver (the
engine's ModelRunner for steps, engine.runner.padded_forward for padded batches), which takes
part in the all-reduces. It exits on STOP, on any error (with the traceback in its log: the
driver's next collective then fails fast), or when its parent process is gone.
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

from uora_rt.adapters.manager import AdapterManager, factor_dtype_for
from uora_rt.core import format as fmt
from uora_rt.engine.kv_cache import KVPool
from uora_rt.engine.runner import ModelRunner, padded_forward
from uora_rt.kernels.routes import KernelPrefs
from uora_rt.models.common import Shard
from uora_rt.parallel import comm, shard
from uora_rt.parallel.driver import ATTENTION_PATHS, IDLE, all_reduce, backend_for
from uora_rt.parallel.step import decode_step, split_adapters

log = logging.getLogger("uora_rt.parallel")


class Worker:
    def __init__(self, model, manager: AdapterManager, chan: comm.Channel):
        self.model, self.manager, self.chan = model, manager, chan
        # The driver's kernel preferences are the defaults too (TP turns the parallel shrink
        # off on both sides); each step's routes are then chosen alike on every rank.
        self.prefs = KernelPrefs(parallel_shrink=False)
        self.entries: dict = {}    # driver uid -> Entry (registered here as "#uid")
        self.runners: dict = {}    # kv id -> ModelRunner over this rank's share of the cache
        self.handlers = {comm.ADD: self.add, comm.DROP: self.drop, comm.UPLOAD: self.upload,
                         comm.KV_OPEN: self.kv_open, comm.KV_CLOSE: self.kv_close,
                         comm.STEP: self.step, comm.FORWARD: self.forward}

    def loop(self) -> None:
        while True:
            op, ints, tensors = self.chan.recv()
            if op == comm.STOP:
                return
            self.handlers[op](ints, tensors)

    # --- the manager's mirror -----------------------------------------------------------------
    def add(self, ints, tensors) -> None:
        uid, source = ints[0], comm.text(tensors[1])
        adapter = fmt.loads(tensors[0].cpu().numpy().tobytes(), source)
        self.entries[uid] = self.manager.add(f"#{uid}", adapter, source)

    def drop(self, ints, tensors) -> None:
        self.manager.remove(f"#{ints[0]}")  # never leased here: dropped at once, as on the driver
        del self.entries[ints[0]]

    def upload(self, ints, tensors) -> None:
        uid, slot = ints
        self.manager.place(self.entries[uid], slot)

    # --- engines' KV caches and forwards ------------------------------------------------------
    def kv_open(self, ints, tensors) -> None:
        kv_id, num_blocks, block_size, path = ints
        kv = KVPool(self.model.spec, num_blocks, block_size, self.model.embed.weight.dtype,
                    self.manager.device)
        self.runners[kv_id] = ModelRunner(self.model, kv, self.manager, self.prefs,
                                          ATTENTION_PATHS[path], cuda_graphs=False)

    def kv_close(self, ints, tensors) -> None:
        self.runners.pop(ints[0], None)

    def step(self, ints, tensors) -> None:
        kv_id, meta = decode_step(ints, tensors, self.manager.device)
        # No logits rows: the hidden state is replicated after the last all-reduce, and rank 0
        # alone computes the head and samples.
        self.runners[kv_id].forward(meta, rows=meta.logits_rows)

    def forward(self, ints, tensors) -> None:
        ids, positions, valid = tensors[:3]
        slots, with_q, _ = split_adapters(ints, tensors[3:])
        padded_forward(self.model, self.manager, self.prefs, ids, positions, valid, slots, with_q)


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
    model = shard.load_shard(a.base, Shard(a.rank, a.world, all_reduce), device, dtype)
    manager = AdapterManager(shard.full_sites(config), device, shard.architecture(config),
                             a.slots, factor_dtype_for(device, dtype))
    store.set(f"tp_ready_{a.rank}", "1")
    timeout = timedelta(seconds=a.timeout)
    dist.init_process_group(backend_for(device), store=store, rank=a.rank, world_size=a.world,
                            timeout=timeout)
    worker = Worker(model, manager, comm.Channel(dist.new_group(timeout=IDLE), device))
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
