"""How a Llama-family decoder splits across N tensor-parallel ranks (Megatron-style).

Column-parallel (outputs split by rank): qkv (whole heads: rank k holds query heads
[k·nH/N, (k+1)·nH/N) and the KV heads they read) and gate_up. Row-parallel (inputs split, partial
outputs summed by one all-reduce): o and down; their biases are added once, after the sum. The
embedding, the norms and the LM head are replicated (simplest; a vocab-parallel head would save
memory on large vocabularies, not needed for correctness).
"""

from __future__ import annotations

import dataclasses

import torch

from uora_rt import models
from uora_rt.models import checkpoint
from uora_rt.models.common import Shard
from uora_rt.models.llama import LlamaModel, LlamaSpec

# HF tensor name suffix -> dimension split across ranks (0: rows = outputs, 1: columns = inputs).
_SPLIT = {"self_attn.q_proj.weight": 0, "self_attn.k_proj.weight": 0,
          "self_attn.v_proj.weight": 0, "self_attn.q_proj.bias": 0, "self_attn.k_proj.bias": 0,
          "self_attn.v_proj.bias": 0, "self_attn.o_proj.weight": 1, "mlp.gate_proj.weight": 0,
          "mlp.up_proj.weight": 0, "mlp.gate_proj.bias": 0, "mlp.up_proj.bias": 0,
          "mlp.down_proj.weight": 1}


def check_divisible(spec: LlamaSpec, n: int) -> None:
    """Raises ValueError (before any process starts) when the model cannot split n ways."""
    if not isinstance(n, int) or isinstance(n, bool):
        raise TypeError(f"tensor_parallel: expected a positive integer, got {n!r}")
    if n < 1:
        raise ValueError(f"tensor_parallel: expected a positive integer, got {n!r}")
    bad = [f"{what} = {v}" for what, v in (("num_attention_heads", spec.heads),
                                           ("num_key_value_heads", spec.kv_heads),
                                           ("intermediate_size", spec.intermediate)) if v % n]
    if bad:
        raise ValueError(f"tensor_parallel = {n}: {', '.join(bad)} not divisible by {n} (heads, "
                         f"KV heads and the MLP width are split evenly across ranks)")


def shard_spec(spec: LlamaSpec, n: int) -> LlamaSpec:
    """The spec one rank's model is built from: its heads, KV heads and MLP width."""
    return dataclasses.replace(spec, heads=spec.heads // n, kv_heads=spec.kv_heads // n,
                               intermediate=spec.intermediate // n)


def shard_tensors(tensors: dict, rank: int, n: int) -> dict:
    """HF checkpoint tensors -> the slices rank `rank` of n holds (the rest replicated)."""
    out = {}
    for name, t in tensors.items():
        dim = next((d for suffix, d in _SPLIT.items() if name.endswith(suffix)), None)
        out[name] = t if dim is None else t.chunk(n, dim=dim)[rank]
    return out


def full_sites(config: dict):
    """The unsharded model's adapter sites: every rank's manager validates and stores adapters
    against the full shapes (a rank reads its slice of the vectors; see adapters/batch.py)."""
    with torch.device("meta"):
        return LlamaModel(LlamaSpec.from_config(config)).sites()


def architecture(config: dict) -> str:
    return (config.get("architectures") or [config.get("model_type", "?")])[0]


def read_spec(folder) -> tuple[dict, LlamaSpec]:
    config = checkpoint.read_config(folder)
    with torch.device("meta"):
        model = models.build(config, folder, checkpoint.tensor_index(folder).keys())
    if model.kind != "decoder":
        raise ValueError(f"{folder}: tensor parallelism serves Llama-family decoders, not "
                         f"{type(model).__name__}")
    return config, model.spec


def load_shard(folder, part: Shard, device, dtype) -> LlamaModel:
    """One rank's model: the sharded spec, loaded from the checkpoint's slices."""
    _, spec = read_spec(folder)
    with torch.device("meta"):
        model = LlamaModel(shard_spec(spec, part.world), part)
    model = model.to(dtype).to_empty(device=torch.device(device))
    model.init_buffers()
    model.load_checkpoint(shard_tensors(checkpoint.load_tensors(folder), part.rank, part.world))
    return model.eval().requires_grad_(False)
