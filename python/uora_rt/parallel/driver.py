"""Rank 0 of a tensor-parallel runtime: starts the workers, sends them every change and every
step, and runs its own shard of each forward (the engine and the sampler run here only).

Backend: gloo on the CPU (tested: 2 processes), nccl on CUDA (written for one GPU per rank,
cuda:k on rank k, but NOT run: the two-GPU machine was not available). Failure is an error,
never a hang: start-up polls the workers while it waits for them (a worker that dies or does
not report within UORA_RT_TP_START_TIMEOUT seconds, default 600, fails the load with its log),
every step first checks that the workers are alive, and every collective after a message's
header has the group's timeout (UORA_RT_TP_TIMEOUT seconds, default 300). After any failure the group is marked broken and
each later call raises at once. One tensor-parallel runtime per process (torch.distributed's
default group); close() or interpreter exit stops the workers.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from uora_rt.core import format as fmt
from uora_rt.models.common import PaddedAttention
from uora_rt.parallel import comm, shard
from uora_rt.parallel.hook import ShardedHook
from uora_rt.parallel.step import adapter_ints_tensors, encode_step
from uora_rt.adapters.pool import AdapterPool

log = logging.getLogger("uora_rt.parallel")

# NVLink multicast stays off on the lent machines (it faults there), in every process.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
# The header group's timeout: idle workers wait in it for the next step for as long as the
# server idles (a driver that dies closes the sockets, and the workers watch their parent).
IDLE = timedelta(days=365)
ATTENTION_PATHS = ("cpp", "triton", "torch")


def timeout_s(start: bool = False) -> float:
    """Seconds: collectives (default 300), or start-up, which loads the shards (default 600)."""
    if start:
        return float(os.environ.get("UORA_RT_TP_START_TIMEOUT", "600"))
    return float(os.environ.get("UORA_RT_TP_TIMEOUT", "300"))


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class DriverPool(AdapterPool):
    """Rank 0's pool. Every registration, device-slot upload and final drop is also queued, in
    order, for the workers; the queue is sent before the next forward, from the thread that
    runs forwards, so adapters may be added or removed from any thread. Entries get a uid (names
    can be reused after a removal)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.pending: list[tuple] = []
        self.uids: dict = {}  # Entry -> uid
        self._next_uid = 0

    def add(self, name, adapter) -> None:
        data = _file_bytes(adapter)
        with self._lock:  # so no upload of this entry can be queued before its add
            super().add(name, adapter)
            entry = self.entries[name]
            self.uids[entry], self._next_uid = self._next_uid, self._next_uid + 1
            self.pending.append((comm.ADD, [self.uids[entry], entry.family.serial],
                                 [data, comm.text_tensor(str(entry.path or name))]))

    def _write_slot(self, entry, s) -> None:
        super()._write_slot(entry, s)
        self.pending.append((comm.UPLOAD, [self.uids[entry], s], []))

    def _drop(self, entry) -> None:
        super()._drop(entry)
        self.pending.append((comm.DROP, [self.uids.pop(entry)], []))

    def snapshot(self, slots: dict, with_q: dict):
        """(the queued changes, the adapter hook of a forward) from one state of the pool: the
        workers replay exactly those changes and then build their hook, so all ranks see the
        same families and modules (an add from another thread may widen a family's tables;
        the row-parallel reduce needs every rank to concatenate the same shrinks)."""
        with self._lock:
            out, self.pending = self.pending, []
            return out, (self.hook(slots, with_q) if slots else None)


def _file_bytes(adapter: fmt.Adapter) -> torch.Tensor:
    """The adapter as `.uora` bytes (workers parse and validate them as a file)."""
    if adapter.path is not None:
        data = Path(adapter.path).read_bytes()
    else:
        with tempfile.TemporaryDirectory() as d:
            fmt.save(adapter, Path(d) / "a.uora")
            data = (Path(d) / "a.uora").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class TensorParallel:
    """The driver's end of the group. Built by load_runtime."""

    def __init__(self, folder: Path, world: int, device: torch.device, dtype, slots: int):
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: one "
                               "tensor-parallel runtime per process (close() the other first)")
        self.world, self.device = world, device
        self.timeout, self.start_timeout = timeout_s(), timeout_s(start=True)
        self.model = self.pool = self.chan = None
        self.broken: str | None = None
        self.closed = False
        self._lock = threading.RLock()
        self._kv_ids = 0
        self._kv_closing: list[int] = []  # engines gone: their worker caches, freed next message
        self.logdir = Path(tempfile.mkdtemp(prefix="uora_tp_"))
        self.store = dist.TCPStore("127.0.0.1", 0, world, is_master=True,
                                   timeout=timedelta(seconds=self.start_timeout),
                                   wait_for_workers=False)
        env = dict(os.environ, **NO_MULTICAST)
        # The workers import the same uora_rt as this process, installed or not.
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        if device.type == "cuda":  # rank 0's own NCCL reads them too
            os.environ.update(NO_MULTICAST)
        self.procs = []
        for rank in range(1, world):
            cmd = [sys.executable, "-m", "uora_rt.parallel.worker", "--rank", str(rank),
                   "--world", str(world), "--port", str(self.store.port), "--base", str(folder),
                   "--device", device.type, "--dtype", str(dtype).removeprefix("torch."),
                   "--slots", str(slots), "--timeout", str(self.timeout),
                   "--start-timeout", str(self.start_timeout),
                   "--parent", str(os.getpid())]
            with open(self.logdir / f"worker{rank}.log", "wb") as out:  # the child keeps a copy
                self.procs.append(subprocess.Popen(cmd, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL))
        atexit.register(self.close)

    # --- start-up and health ------------------------------------------------------------------
    def join(self) -> None:
        """Waits (bounded, watching the workers) until every worker has loaded its shard, then
        forms the process groups."""
        deadline = time.monotonic() + self.start_timeout
        keys = [f"tp_ready_{r}" for r in range(1, self.world)]
        while not self.store.check(keys):
            self._check_workers("while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(self._describe(f"tensor-parallel workers did not start within "
                                                  f"{self.start_timeout:.0f} s"))
            time.sleep(0.05)
        dist.init_process_group(backend_for(self.device), store=self.store, rank=0,
                                world_size=self.world, timeout=timedelta(seconds=self.timeout))
        self.chan = comm.Channel(dist.new_group(timeout=IDLE), self.device)

    def _check_workers(self, when: str) -> None:
        dead = [(r, p.returncode) for r, p in enumerate(self.procs, 1) if p.poll() is not None]
        if dead:
            self.broken = ", ".join(f"worker {r} exited with code {c}" for r, c in dead)
            raise RuntimeError(self._describe(f"tensor parallelism: {self.broken} {when}"))

    def _describe(self, what: str) -> str:
        lines = [what]
        for r in range(1, self.world):
            log = self.logdir / f"worker{r}.log"
            tail = log.read_text(errors="replace").strip().splitlines()[-8:] if log.exists() else []
            lines.append(f"--- worker {r} log ({log}):" + "".join(f"\n    {t}" for t in tail))
        return "\n".join(lines)

    @contextmanager
    def _exclusive(self, what: str, slots=None, with_q=None):
        """One message (and its forward) at a time, after the queued changes; yields rank 0's
        ShardedHook for {Family: token slots}. Any failure breaks the group for good (the ranks
        are no longer in lockstep)."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the tensor-parallel runtime is closed")
            if self.broken:
                raise RuntimeError(f"the tensor-parallel group is broken ({self.broken})")
            self._check_workers(f"before {what}")
            try:
                pending, adapters = self.pool.snapshot(slots or {}, with_q or {})
                while self._kv_closing:
                    self.chan.send(comm.KV_CLOSE, [self._kv_closing.pop(0)])
                for op, ints, tensors in pending:
                    self.chan.send(op, ints, tensors)
                yield ShardedHook(0, self.world, adapters)
            except BaseException as e:
                self.broken = f"{what} failed: {type(e).__name__}: {e}"
                if not isinstance(e, Exception):  # KeyboardInterrupt mid-step: as it is
                    raise
                time.sleep(0.2)  # let a crashed worker's exit code and log land
                dead = [p.poll() for p in self.procs]
                raise RuntimeError(self._describe(f"tensor parallelism: {self.broken} (worker "
                                                  f"exit codes: {dead})")) from e

    # --- what the runtime and the engine call ---------------------------------------------------
    def open_kv(self, num_blocks: int, block_size: int, attention_path: str) -> int:
        """Each worker allocates its KV heads' share of an engine's paged cache."""
        with self._exclusive("opening a KV cache"):
            self._kv_ids += 1
            self.chan.send(comm.KV_OPEN, [self._kv_ids, num_blocks, block_size,
                                          ATTENTION_PATHS.index(attention_path)])
            return self._kv_ids

    def close_kv(self, kv_id: int) -> None:
        """Queued, not sent: safe from any thread and from a finalizer (which may run in the
        middle of a step); the workers free the cache before the next message."""
        self._kv_closing.append(kv_id)

    def run_step(self, meta, kv_id: int, attention):
        """An engine step: the workers get its metadata, every rank runs its shard; logits of
        meta.logits_rows (rank 0's head over the replicated hidden state)."""
        ints, tensors = encode_step(meta, kv_id)
        with self._exclusive("an engine step", meta.adapter_slots, meta.adapter_with_q) as hook:
            self.chan.send(comm.STEP, ints, tensors)
            return self.model(meta.input_ids, meta.positions, attention, hook,
                              rows=meta.logits_rows)

    def run_padded(self, ids, positions, valid, slots: dict, with_q: dict):
        """Runtime.forward of a padded batch: logits [B, L, V]."""
        a_ints, a_tensors = adapter_ints_tensors(slots, with_q)
        with self._exclusive("a forward", slots, with_q) as hook:
            self.chan.send(comm.FORWARD, a_ints, [ids, positions, valid] + a_tensors)
            return self.model(ids, positions, PaddedAttention(valid), hook)

    def close(self) -> None:
        """Stops the workers (STOP if the group is healthy, else kill), bounded in time."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self.chan is not None and not self.broken:
                try:
                    self.chan.send(comm.STOP)
                except RuntimeError as e:  # a dead worker: the kill below ends the rest
                    log.warning("tensor parallelism: stopping the workers: %s", e)
            for p in self.procs:
                try:
                    p.wait(timeout=10 if self.chan is not None and not self.broken else 0.5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if dist.is_initialized():
                dist.destroy_process_group()
            self.store = None
            shutil.rmtree(self.logdir, ignore_errors=True)
            atexit.unregister(self.close)


def load_runtime(cls, folder: Path, device, dtype, slots: int, world: int):
    """Runtime.from_folder(..., tensor_parallel=world): the config is checked before any process
    starts; the workers load their shards while rank 0 loads its own."""
    from uora_rt.runtime import pool_settings

    config, spec = shard.read_spec(folder)
    shard.check_divisible(spec, world)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    tp = TensorParallel(folder, world, device, dtype, slots)
    try:
        model = shard.load_shard(folder, 0, world, device, dtype)
        arch, factor_dtype = pool_settings(config, device, dtype)
        tp.pool = DriverPool(shard.full_sites(config), device, arch, False, slots,
                             factor_dtype)
        tp.model = model
        tp.join()
        rt = cls(model, config, device, folder, False, slots, pool=tp.pool)
    except BaseException:
        tp.close()
        raise
    rt.tp = tp
    return rt
