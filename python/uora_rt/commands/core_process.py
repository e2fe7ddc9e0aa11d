"""The engine core process as `uora-rt serve` runs it: started, waited for, watched, stopped.

A core that exits while the server runs is a fault: the front ends end their requests with an
error within a fraction of a second (they watch it too), and one second later the HTTP server
shuts down and `uora-rt serve` exits with code 1 (no
restart: requests in flight on the dead core cannot be resumed, and a supervisor restarting the
whole server is safer than a half-restarted one). No process outlives the server: the core
watches its parent, its tensor-parallel workers watch the core.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from uora_rt.engine.client import CoreClient, CoreGone
from uora_rt.engine.messages import ENCODER, Shutdown

log = logging.getLogger("uora_rt.server")


def start_timeout_s() -> float:
    """Loading a large base and capturing its CUDA graphs can take minutes."""
    return float(os.environ.get("UORA_RT_CORE_START_TIMEOUT", "1800"))


def core_options(args, adapters, address: str | None = None) -> dict:
    """What the engine core needs of `uora-rt serve`'s arguments (JSON: it crosses processes)."""
    return {"base": None if args.base is None else str(args.base), "device": args.device,
            "dtype": args.dtype, "slots": args.slots, "tensor_parallel": args.tensor_parallel,
            "random_weights": args.random_weights,
            "adapters": [[n, str(p)] for n, p in adapters],
            "kv_cache_tokens": args.kv_cache_tokens, "max_num_seqs": args.max_num_seqs,
            "enable_prefix_caching": args.enable_prefix_caching,
            "async_scheduling": getattr(args, "async_scheduling", True),
            "max_step_tokens": args.max_step_tokens, "log_level": args.log_level,
            "address": address, "parent": os.getpid()}


class CoreProcess:
    def __init__(self, args, adapters):
        self.tmp = Path(tempfile.mkdtemp(prefix="uora_rt_core_"))
        self.address = f"ipc://{self.tmp}/core.sock"
        opts = core_options(args, adapters, self.address)
        config = self.tmp / "core.json"
        config.write_text(json.dumps(opts))
        self.proc = subprocess.Popen([sys.executable, "-m", "uora_rt.commands.engine_core",
                                      str(config)], stdin=subprocess.DEVNULL)
        self.died = False
        self.on_death = None  # shuts the front ends down (set once they run)
        self._stopping = threading.Event()

    def wait_ready(self) -> int | None:
        """None once the core answers; its exit code if it exits first (it printed why)."""
        async def probe():
            client = CoreClient(self.address, self.proc.pid)
            try:
                await client.connect(start_timeout_s())
            finally:
                client.close()

        try:
            asyncio.run(probe())
        except CoreGone as e:
            if self.proc.poll() is None:  # alive but silent past the timeout
                print(f"uora-rt serve: {e}", file=sys.stderr)
                return 1
            return self.proc.wait() or 1
        threading.Thread(target=self._watch, name="uora-core-watch", daemon=True).start()
        return None

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            if self.proc.poll() is not None:
                self.died = True
                log.error("the engine core exited with code %s; stopping the server",
                          self.proc.returncode)
                time.sleep(1.0)  # the front ends end their streams with an error first
                if self.on_death is not None:
                    self.on_death()
                return

    def stop(self, timeout_s: float = 10.0) -> None:
        """Asks the core to finish (it aborts what still runs), then makes sure it is gone."""
        self._stopping.set()
        if self.proc.poll() is None:
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 500)
            sock.connect(self.address)
            sock.send(ENCODER.encode(Shutdown()))
            sock.close()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
