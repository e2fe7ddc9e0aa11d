"""Shared pieces of the tensor-parallel tests."""

import os

import torch.distributed as dist


def short_tp_timeout():
    """Collectives and start-up give up after 60 s (a broken test fails, never hangs)."""
    keys = ("UORA_RT_TP_TIMEOUT", "UORA_RT_TP_START_TIMEOUT")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "60" for k in keys})
    yield
    for k, v in old.items():
        if v is None:
            del os.environ[k]
        else:
            os.environ[k] = v


def closed(rt):
    """Closes a tensor-parallel runtime and checks that nothing of it is left."""
    procs = rt.tp.procs
    rt.close()
    assert all(p.poll() is not None for p in procs), "a worker outlived close()"
    assert not dist.is_initialized()
