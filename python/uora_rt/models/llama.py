"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in plain PyTorch, one readable page.

Numerics follow transformers' modeling_llama: RMSNorm in float32, rotate_half RoPE with cos/sin
cast to the model dtype, GQA. Our own layout fuses q/k/v and gate/up into one GEMM each; adapted
modules are addressed through `Site`s and their deltas added by the adapter hook right after the
fused GEMM (DESIGN §4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from uora_rt.models.common import KVCache, Site, run_group


@dataclass
class LlamaSpec:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    max_positions: int

    @classmethod
    def from_config(cls, cfg: dict) -> "LlamaSpec":
        heads = cfg["num_attention_heads"]
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                              else None)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"llama: hidden_act {cfg.get('hidden_act')!r} is not supported")
        if cfg.get("use_sliding_window"):
            raise ValueError("llama/qwen2: sliding-window attention is not supported")
        qwen = cfg.get("model_type") == "qwen2"
        return cls(
            vocab=cfg["vocab_size"], hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"], heads=heads,
            kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=qwen or bool(cfg.get("attention_bias", False)),
            o_bias=bool(cfg.get("attention_bias", False)) and not qwen,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            max_positions=cfg.get("max_position_embeddings", 4096))


def rope_inv_freq(spec: LlamaSpec) -> torch.Tensor:
    hd = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    sc = spec.rope_scaling
    if not sc or sc.get("rope_type", sc.get("type", "default")) == "default":
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":  # transformers' _compute_llama3_parameters
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"llama: rope type {kind!r} is not supported")


def rms_norm(x, weight, eps):
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LlamaLayer(nn.Module):
    def __init__(self, s: LlamaSpec):
        super().__init__()
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.in_norm = nn.Parameter(torch.ones(s.hidden))
        self.qkv = nn.Linear(s.hidden, q + 2 * kv, bias=s.qkv_bias)       # [q | k | v]
        self.o = nn.Linear(q, s.hidden, bias=s.o_bias)
        self.post_norm = nn.Parameter(torch.ones(s.hidden))
        self.gate_up = nn.Linear(s.hidden, 2 * s.intermediate, bias=s.mlp_bias)  # [gate | up]
        self.down = nn.Linear(s.intermediate, s.hidden, bias=s.mlp_bias)


class LlamaModel(nn.Module):
    """forward(ids [B, L], positions [B, L], key_valid [B, S], cache, hook) -> logits [B, L', V]."""

    kind = "decoder"

    def __init__(self, spec: LlamaSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(LlamaLayer(spec) for _ in range(spec.layers))
        self.norm = nn.Parameter(torch.ones(spec.hidden))
        self.lm_head = None if spec.tie_embeddings else nn.Linear(spec.hidden, spec.vocab, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)

    def init_buffers(self) -> None:
        """Recomputes non-persistent buffers (after to_empty / a dtype cast): RoPE stays float32."""
        self.inv_freq = rope_inv_freq(self.spec).to(self.embed.weight.device)

    # --- adapter sites and checkpoint names -------------------------------------------------
    def sites(self) -> list[Site]:
        s, out = self.spec, []
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for i in range(s.layers):
            p = f"model.layers.{i}"
            out += [Site(f"{p}.self_attn.q_proj", i, "qkv", 0, q, s.hidden),
                    Site(f"{p}.self_attn.k_proj", i, "qkv", q, kv, s.hidden),
                    Site(f"{p}.self_attn.v_proj", i, "qkv", q + kv, kv, s.hidden),
                    Site(f"{p}.self_attn.o_proj", i, "o", 0, s.hidden, q),
                    Site(f"{p}.mlp.gate_proj", i, "gate_up", 0, s.intermediate, s.hidden),
                    Site(f"{p}.mlp.up_proj", i, "gate_up", s.intermediate, s.intermediate, s.hidden),
                    Site(f"{p}.mlp.down_proj", i, "down", 0, s.hidden, s.intermediate)]
        return out

    def group_linear(self, layer: int, group: str) -> nn.Linear:
        return getattr(self.layers[layer], group)

    def load_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copies HF LlamaForCausalLM tensors into the fused layout (stray keys are ignored)."""
        t = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
        with torch.no_grad():
            self.embed.weight.copy_(t["model.embed_tokens.weight"])
            self.norm.copy_(t["model.norm.weight"])
            if self.lm_head is not None:
                self.lm_head.weight.copy_(t.get("lm_head.weight", t["model.embed_tokens.weight"]))
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}"
                a, m = f"{p}.self_attn", f"{p}.mlp"
                layer.in_norm.copy_(t[f"{p}.input_layernorm.weight"])
                layer.post_norm.copy_(t[f"{p}.post_attention_layernorm.weight"])
                layer.qkv.weight.copy_(torch.cat([t[f"{a}.{n}_proj.weight"] for n in "qkv"]))
                if layer.qkv.bias is not None:
                    layer.qkv.bias.copy_(torch.cat([t[f"{a}.{n}_proj.bias"] for n in "qkv"]))
                layer.o.weight.copy_(t[f"{a}.o_proj.weight"])
                if layer.o.bias is not None:
                    layer.o.bias.copy_(t[f"{a}.o_proj.bias"])
                layer.gate_up.weight.copy_(torch.cat([t[f"{m}.gate_proj.weight"],
                                                      t[f"{m}.up_proj.weight"]]))
                layer.down.weight.copy_(t[f"{m}.down_proj.weight"])
                if self.spec.mlp_bias:
                    layer.gate_up.bias.copy_(torch.cat([t[f"{m}.gate_proj.bias"],
                                                        t[f"{m}.up_proj.bias"]]))
                    layer.down.bias.copy_(t[f"{m}.down_proj.bias"])

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        s = self.spec
        return KVCache(s.layers, batch, s.kv_heads, capacity, s.head_dim, self.embed.weight.dtype,
                       self.embed.weight.device)

    # --- decode step (CUDA-graph safe) --------------------------------------------------------
    def decode(self, ids, positions, key_valid, write_idx, cache: KVCache, hook=None):
        """One token per row with every shape and index fixed, so the step can be captured in a
        CUDA graph and replayed: ids, positions [B, 1]; write_idx [1] (device) is where this
        token's key/value go; key_valid [B, capacity] must already include that position.
        Attention runs over the whole capacity, masked. Returns logits [B, V]."""
        s = self.spec
        b = ids.shape[0]
        x = self.embed(ids)                                                  # [B, 1, H]
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        mask = key_valid[:, None, None, :]                                   # [B, 1, 1, C]
        group = s.heads // s.kv_heads
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.in_norm, s.rms_eps)
            qkv = run_group(hook, i, "qkv", layer.qkv, h)                    # [B, 1, q+2kv]
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(b, 1, s.heads, s.head_dim).transpose(1, 2)
            k = k.view(b, 1, s.kv_heads, s.head_dim).transpose(1, 2)
            v = v.reshape(b, 1, s.kv_heads, s.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            cache.k[i].index_copy_(2, write_idx, k)
            cache.v[i].index_copy_(2, write_idx, v)
            # GQA without copying the cache: a group's query heads become queries of one KV head.
            qg = q.reshape(b, s.kv_heads, group, s.head_dim)                 # [B, nKV, g, hd]
            att = F.scaled_dot_product_attention(qg, cache.k[i], cache.v[i], attn_mask=mask)
            att = att.reshape(b, 1, q_size)
            o = run_group(hook, i, "o", layer.o, att)
            x = x + o
            h = rms_norm(x, layer.post_norm, s.rms_eps)
            gu = run_group(hook, i, "gate_up", layer.gate_up, h)
            gate, up = gu.chunk(2, dim=-1)
            x = x + run_group(hook, i, "down", layer.down, F.silu(gate) * up)
        x = rms_norm(x[:, 0], self.norm, s.rms_eps)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)                                             # [B, V]

    # --- forward ----------------------------------------------------------------------------
    def forward(self, ids, positions, key_valid, cache: KVCache | None, hook=None,
                last_only=False, select=None):
        """ids, positions: [B, L]; key_valid: [B, cache.length + L] bool (False = padding).
        Writes this step's keys/values at cache[length : length + L] and advances the cache;
        cache=None attends within this call only (training). Logits: [B, L, V], or [B, 1, V]
        with last_only, or [N, V] for the N positions where `select` [B, L] is True (the LM head
        is a large share of a small model's FLOPs: compute only what is used)."""
        s = self.spec
        b, n = ids.shape
        start = cache.length if cache is not None else 0
        x = self.embed(ids)                                                  # [B, L, H]
        freqs = positions.float()[..., None] * self.inv_freq                 # [B, L, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None], emb.sin().to(x.dtype)[:, None]
        # Mask [B, 1, L, S]: causal over the cache, padding keys hidden; each position may always
        # see itself so that padding rows never softmax over nothing.
        total = start + n
        qpos = torch.arange(start, total, device=ids.device)
        kpos = torch.arange(total, device=ids.device)
        mask = (kpos[None, :] <= qpos[:, None])[None] & key_valid[:, None, :total]
        mask = (mask | (kpos[None, :] == qpos[:, None])[None])[:, None]
        # No padding and a fresh cache: plain causal attention, which SDPA runs on its fast
        # kernels (an explicit mask sends it to slower ones).
        causal_only = start == 0 and not key_valid.device.type == "cuda" and bool(
            key_valid[:, :total].all())
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.in_norm, s.rms_eps)
            qkv = run_group(hook, i, "qkv", layer.qkv, h)                    # [B, L, q+2kv]
            q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(b, n, s.heads, s.head_dim).transpose(1, 2)            # [B, nH, L, hd]
            k = k.view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)         # [B, nKV, L, hd]
            v = v.view(b, n, s.kv_heads, s.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            if cache is not None:  # the cache may have more rows (a decode bucket): use the first B
                cache.k[i, :b, :, start:total] = k
                cache.v[i, :b, :, start:total] = v
                k, v = cache.k[i, :b, :, :total], cache.v[i, :b, :, :total]  # [B, nKV, S, hd]
            att = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if causal_only else mask, is_causal=causal_only,
                enable_gqa=s.kv_heads != s.heads)                            # [B, nH, L, hd]
            att = att.transpose(1, 2).reshape(b, n, q_size)
            o = run_group(hook, i, "o", layer.o, att)
            x = x + o
            h = rms_norm(x, layer.post_norm, s.rms_eps)
            gu = run_group(hook, i, "gate_up", layer.gate_up, h)             # [B, L, 2I]
            gate, up = gu.chunk(2, dim=-1)
            act = F.silu(gate) * up
            d = run_group(hook, i, "down", layer.down, act)
            x = x + d
        if cache is not None:
            cache.length = total
        if last_only:
            x = x[:, -1:]
        elif select is not None:
            x = x[select]                                                    # [N, H]
        x = rms_norm(x, self.norm, s.rms_eps)
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(x, head)                                             # [B, L', V]
