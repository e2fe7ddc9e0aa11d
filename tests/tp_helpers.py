"""Shared pieces of the tensor-parallel tests."""

import os

import torch.distributed as dist


def short_tp_timeout():
    """Collectives and start-up give up after 60 s (a broken test fails, never hangs)."""
    old = os.environ.get("UORA_RT_TP_TIMEOUT")
    os.environ["UORA_RT_TP_TIMEOUT"] = "60"
    yield
    if old is None:
        del os.environ["UORA_RT_TP_TIMEOUT"]
    else:
        os.environ["UORA_RT_TP_TIMEOUT"] = old


def closed(rt):
    """Closes a tensor-parallel runtime and checks that nothing of it is left."""
    procs = rt.tp.procs
    rt.close()
    assert all(p.poll() is not None for p in procs), "a worker outlived close()"
    assert not dist.is_initialized()
