"""Tensor parallelism's failures: a bad config before any process starts, a worker that dies
at start-up or while serving: clear errors, bounded in time, nothing left behind."""

import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from engine_helpers import BASES, build, load
from models_tiny import tiny_bert
from tp_helpers import closed, short_tp_timeout

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")
_short_timeout = pytest.fixture(scope="module", autouse=True)(short_tp_timeout)


def test_bad_config_raises_before_any_process_starts(tmp_path, monkeypatch):
    def no_spawn(*a, **k):
        raise AssertionError("a worker was spawned")

    monkeypatch.setattr(subprocess, "Popen", no_spawn)
    BASES["llama"]().save_pretrained(tmp_path / "base")  # 4 heads, 2 KV heads, MLP 96
    with pytest.raises(ValueError, match="num_attention_heads = 4, num_key_value_heads = 2 not "
                                         "divisible by 3"):
        load(tmp_path / "base", {}, tensor_parallel=3)
    with pytest.raises(ValueError, match="num_key_value_heads = 2 not divisible by 4"):
        load(tmp_path / "base", {}, tensor_parallel=4)
    with pytest.raises(ValueError, match="positive integer"):
        load(tmp_path / "base", {}, tensor_parallel=0)
    tiny_bert().save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="serves Llama-family decoders, not BertModel"):
        load(tmp_path / "bert", {}, tensor_parallel=2)


def test_worker_death_is_a_clear_error_not_a_hang(tmp_path):
    _, base, ads = build(tmp_path, n_adapters=1)
    rt = load(base, ads, tensor_parallel=2)
    ids, mask = torch.randint(0, 97, (4, 9)), torch.ones(4, 9, dtype=torch.long)
    rt.forward(ids, mask, ["a0"] * 4)
    rt.tp.procs[0].kill()
    rt.tp.procs[0].wait(10)
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="worker 1 exited with code -9"):
        rt.forward(ids, mask, ["a0"] * 4)
    with pytest.raises(RuntimeError, match="broken"):
        rt.forward(ids, mask)
    assert time.monotonic() - t < 10
    closed(rt)


def test_worker_that_fails_to_start_is_a_clear_error(tmp_path, monkeypatch):
    BASES["llama"]().save_pretrained(tmp_path / "base")
    monkeypatch.setattr(sys, "executable", "/bin/false")  # the worker exits at once with 1
    t = time.monotonic()
    with pytest.raises(RuntimeError, match="worker 1 exited with code 1 while starting"):
        load(tmp_path / "base", {}, tensor_parallel=2)
    assert time.monotonic() - t < 30
    assert not dist.is_initialized()
