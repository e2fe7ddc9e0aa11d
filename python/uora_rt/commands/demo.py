"""The main job: several UORA adapters on the packaged SmolLM2-135M-Instruct, served in ONE batch.

1. Materialize the base (dequantize the packaged GGUF once, cached).
2. Train one UORA adapter per style (pirate, French, JSON) with uora_rt's own training code on
   the runtime's model; cached (a few hundred KB each) after the first run.
3. Serve every request in one mixed batch (each sequence its own adapter, or none), print each
   request, its adapter and its output, and a latency/throughput table against the same batch
   without adapters and against one batch per adapter (what a server that cannot mix must do).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import torch
from tqdm import tqdm

import uora_rt
from uora_rt.core import format as fmt
from uora_rt.training import tasks
from uora_rt.models.gguf_import import cache_root
from uora_rt.training.trainer import train_chat_adapter

RECIPE = dict(r=64, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                             "down_proj"], steps=24, lr=5e-2, batch_size=8, seed=0)


def adapter_for(rt, style: str, cache_dir) -> tuple[str, fmt.Adapter, bool]:
    key = hashlib.sha256(json.dumps([RECIPE, tasks.style_pairs(style), str(rt.folder.name)],
                                    sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir / f"{style}-{key}.uora"
    if path.is_file():
        return str(path), fmt.load(path), True
    config = uora_rt.UORAConfig(r=RECIPE["r"], target_modules=RECIPE["targets"])
    adapter = train_chat_adapter(rt, tasks.style_pairs(style), config, steps=RECIPE["steps"],
                                 lr=RECIPE["lr"], batch_size=RECIPE["batch_size"],
                                 seed=RECIPE["seed"], desc=f"training '{style}'")
    fmt.save(adapter, path)
    return str(path), adapter, False


def timed_generate(rt, prompts, names, max_new):
    t = time.perf_counter()
    out = rt.generate(prompts, adapters=names, max_new_tokens=max_new)
    return out, time.perf_counter() - t


def run(args) -> int:
    torch.manual_seed(0)
    print("Loading SmolLM2-135M-Instruct (the packaged GGUF, dequantized once and cached)...")
    t0 = time.perf_counter()
    rt = uora_rt.load("smollm2")
    print(f"  base ready in {time.perf_counter() - t0:.1f} s: {rt.folder}")
    cache_dir = cache_root() / "demo-adapters"
    cache_dir.mkdir(parents=True, exist_ok=True)
    for style in tasks.STYLES:
        t = time.perf_counter()
        path, adapter, cached = adapter_for(rt, style, cache_dir)
        rt.add_adapter(adapter, name=style)
        how = "cached" if cached else f"trained in {time.perf_counter() - t:.0f} s"
        print(f"  adapter {style!r:9} {how:18} {os.path.getsize(path) / 1024:6.0f} KB  "
              f"r={adapter.r}, {adapter.num_parameters():,} trained parameters, "
              f"{int(adapter.count.sum())} reinit events")
    requests = tasks.demo_requests()
    prompts, names = [p for p, _ in requests], [n for _, n in requests]
    max_new = args.max_new_tokens
    rt.generate(prompts[:2], adapters=names[:2], max_new_tokens=2)  # warm-up
    mixed, t_mixed = timed_generate(rt, prompts, names, max_new)
    print(f"\nONE mixed batch of {len(prompts)} requests, {len(set(names))} adapters (incl. none):\n")
    for (prompt, name), g in zip(requests, mixed):
        print(f"  [{name or 'base':6}] {prompt}\n           -> {g.text.strip()}")
    groups = list(dict.fromkeys(names))
    bar = tqdm(total=1 + len(groups), desc="timing baselines", leave=False)
    _, t_base = timed_generate(rt, prompts, [None] * len(prompts), max_new)
    bar.update()
    t_split = 0.0
    for name in groups:  # one batch per adapter, as a server that cannot mix
        idx = [i for i, n in enumerate(names) if n == name]
        _, dt = timed_generate(rt, [prompts[i] for i in idx], [name] * len(idx), max_new)
        t_split += dt
        bar.update()
    bar.close()
    tokens = sum(len(g.tokens) for g in mixed)
    print(f"\n  {'setup':44} {'time':>8} {'tokens/s':>9}")
    for label, dt in [("mixed batch, every sequence its adapter", t_mixed),
                      ("same batch, no adapters (base model)", t_base),
                      ("one batch per adapter (no mixing)", t_split)]:
        print(f"  {label:44} {dt:7.2f}s {tokens / dt:9.1f}")
    print(f"\n  adapters cost {100 * (t_mixed / t_base - 1):+.1f}% over the base model; mixing is "
          f"{t_split / t_mixed:.1f}x faster than one batch per adapter "
          f"({tokens} generated tokens, greedy, float32, {torch.get_num_threads()} threads)")
    return 0
