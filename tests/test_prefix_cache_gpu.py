"""Prefix caching on CUDA (skipped without a GPU): the Triton prefill kernel and the gather path
read cached context through the page table; decode steps replay CUDA graphs as before. Greedy
tokens equal the CPU engine's without caching."""

import pytest
import torch

from engine_helpers import assert_idle, build, load, random_prompts
from test_prefix_cache import run
from uora_rt import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("attention", [None, "torch"])  # None: Triton (+ graphs) if installed
def test_cuda_with_caching_equals_cpu_without(tmp_path, attention):
    _, base, ads = build(tmp_path)
    system = random_prompts(1, seed=101, lo=45, hi=45)[0]  # 2 full blocks of 16
    suffixes = random_prompts(8, seed=102, lo=1, hi=20)
    names = ["a0", "a1", None, "a0", "a2", "a1", None, "a0"]
    arrivals = {}
    for i, (suffix, name) in enumerate(zip(suffixes, names)):
        arrivals.setdefault(2 * i, []).append((system + suffix, name, 10))
    got = {}
    for device, caching in (("cpu", False), ("cuda", True)):
        rt = load(base, ads, device=device)
        engine = Engine(rt, kv_cache_tokens=2048, max_step_tokens=32,
                        attention=attention if device == "cuda" else None,
                        enable_prefix_caching=caching)
        got[device] = run(engine, arrivals)
        assert_idle(engine)
        if device == "cuda" and attention is None and engine.runner.graphs is not None:
            assert engine.runner.graphs.captures >= 1
    assert [o.token_ids for o in got["cuda"]] == [o.token_ids for o in got["cpu"]]
    seen, want = set(), []
    for name in names:
        want.append(32 if name in seen else 0)
        seen.add(name)
    assert [o.cached_tokens for o in got["cuda"]] == want
