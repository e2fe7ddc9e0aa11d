"""Rank 0 of a tensor-parallel runtime: starts the workers, sends them every adapter change and
every step, and runs its own shard of each forward through the same code as one device (the
engine's ModelRunner, engine.runner.padded_forward); the engine and the sampler run here only.

Backend: gloo on the CPU (tested: 2 processes), nccl on CUDA (written for one GPU per rank,
cuda:k on rank k; not yet run on GPUs: tested with gloo on the CPU). Failure is an error,
never a hang: start-up polls the workers while it waits for them (a worker that dies or does
not report within UORA_RT_TP_START_TIMEOUT seconds, default 600, fails the load with its log),
every step first checks that the workers are alive, and every collective after a message's
header has the group's timeout (UORA_RT_TP_TIMEOUT seconds, default 300). After any failure the
group is marked broken and
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

from uora_rt.adapters.manager import AdapterManager, factor_dtype_for
from uora_rt.core import format as fmt
from uora_rt.engine.runner import padded_forward
from uora_rt.models.common import Shard
from uora_rt.parallel import comm, shard
from uora_rt.parallel.step import adapter_ints_tensors, encode_step

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


def _file_bytes(adapter: fmt.Adapter) -> torch.Tensor:
    """The registered adapter as `.uora` bytes (workers parse and validate them as a file),
    written from memory: what the driver registered, whatever its file holds by now."""
    with tempfile.TemporaryDirectory() as d:
        fmt.save(adapter, Path(d) / "a.uora")
        data = (Path(d) / "a.uora").read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def all_reduce(t: torch.Tensor) -> None:
    dist.all_reduce(t)


class TensorParallel:
    """The driver's end of the group. Built by load_runtime."""

    def __init__(self, folder: Path, world: int, device: torch.device, dtype, slots: int):
        if dist.is_initialized():
            raise RuntimeError("torch.distributed is already initialized in this process: one "
                               "tensor-parallel runtime per process (close() the other first)")
        self.world, self.device = world, device
        self.timeout, self.start_timeout = timeout_s(), timeout_s(start=True)
        self.chan = None
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
    def exclusive(self, what: str):
        """One message (and its forward) at a time; freed KV caches are announced first. Any
        failure breaks the group for good (the ranks are no longer in lockstep)."""
        with self._lock:
            if self.closed:
                raise RuntimeError("the tensor-parallel runtime is closed")
            if self.broken:
                raise RuntimeError(f"the tensor-parallel group is broken ({self.broken})")
            self._check_workers(f"before {what}")
            try:
                while self._kv_closing:
                    self.chan.send(comm.KV_CLOSE, [self._kv_closing.pop(0)])
                yield
            except BaseException as e:
                self.broken = f"{what} failed: {type(e).__name__}: {e}"
                if not isinstance(e, Exception):  # KeyboardInterrupt mid-step: as it is
                    raise
                time.sleep(0.2)  # let a crashed worker's exit code and log land
                dead = [p.poll() for p in self.procs]
                raise RuntimeError(self._describe(f"tensor parallelism: {self.broken} (worker "
                                                  f"exit codes: {dead})")) from e

    def _send_changes(self, changes: list) -> None:
        """The adapter manager's recorded changes, in order (AdapterManager.batch took them)."""
        for change in changes:
            kind, entry = change[0], change[1]
            if kind == "add":
                source = str(entry.source or entry.name)
                self.chan.send(comm.ADD, [entry.uid],
                               [_file_bytes(change[2]), comm.text_tensor(source)])
            elif kind == "upload":
                self.chan.send(comm.UPLOAD, [entry.uid, change[2]])
            else:
                self.chan.send(comm.DROP, [entry.uid])

    # --- what the runtime and the engine call ---------------------------------------------------
    def open_kv(self, num_blocks: int, block_size: int, attention_path: str) -> int:
        """Each worker allocates its KV heads' share of an engine's paged cache."""
        with self.exclusive("opening a KV cache"):
            self._kv_ids += 1
            self.chan.send(comm.KV_OPEN, [self._kv_ids, num_blocks, block_size,
                                          ATTENTION_PATHS.index(attention_path)])
            return self._kv_ids

    def close_kv(self, kv_id: int) -> None:
        """Queued, not sent: safe from any thread and from a finalizer (which may run in the
        middle of a step); the workers free the cache before the next message."""
        self._kv_closing.append(kv_id)

    def send_step(self, kv_id: int, meta, changes: list) -> None:
        """Inside exclusive(): the adapter changes taken with the step's batch, then the step;
        each worker's ModelRunner runs its shard of it (engine.runner.ModelRunner.forward)."""
        self._send_changes(changes)
        ints, tensors = encode_step(meta, kv_id)
        self.chan.send(comm.STEP, ints, tensors)

    def forward_padded(self, model, manager, prefs, ids, positions, valid, slots: dict,
                       with_q: dict):
        """Runtime.forward of a padded batch on every rank (engine.runner.padded_forward)."""
        a_ints, a_tensors = adapter_ints_tensors(slots, with_q)

        def announce(changes):
            self._send_changes(changes)
            self.chan.send(comm.FORWARD, a_ints, [ids, positions, valid] + a_tensors)

        with self.exclusive("a forward"):
            return padded_forward(model, manager, prefs, ids, positions, valid, slots, with_q,
                                  announce)

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


def launch(folder: Path, device, dtype, slots: int, world: int):
    """(rank 0's model shard, config, adapter manager, TensorParallel) for Runtime.from_folder(...,
    tensor_parallel=world): the config is checked before any process starts; the workers load
    their shards while rank 0 loads its own."""
    config, spec = shard.read_spec(folder)
    shard.check_divisible(spec, world)
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    tp = TensorParallel(folder, world, device, dtype, slots)
    try:
        model = shard.load_shard(folder, Shard(0, world, all_reduce), device, dtype)
        manager = AdapterManager(shard.full_sites(config), device, shard.architecture(config),
                                 slots, factor_dtype_for(device, dtype))
        manager.record_changes()
        tp.join()
    except BaseException:
        tp.close()
        raise
    return model, config, manager, tp
