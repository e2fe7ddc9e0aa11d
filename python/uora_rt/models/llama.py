"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) in plain PyTorch, one readable page.

Numerics follow transformers' modeling_llama: RMSNorm in float32, rotate_half RoPE with cos/sin
cast to the model dtype, GQA. Our own layout fuses q/k/v and gate/up into one GEMM each; adapted
modules are addressed through `Site`s and their deltas added by the adapter hook right after the
fused GEMM (docs/design.md). Under tensor parallelism (parallel/) a model holds one rank's heads
and MLP width, and its row-parallel groups sum their partial outputs over the ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from uora_rt.kernels.dense import dense
from uora_rt.kernels.fused import apply_rope, elementwise, with_extra
from uora_rt.kernels.routes import TORCH, Routes
from uora_rt.models.common import Shard, Site, run_group


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


# Groups whose inputs are split across tensor-parallel ranks (their outputs are summed); the
# others (qkv, gate_up) split their outputs.
ROW_PARALLEL = ("o", "down")


class LlamaModel(nn.Module):
    """forward(ids, positions, attention, hook) -> logits. One block serves every caller: the
    engine (packed tokens [T] over a paged KV cache), padded batches and training ([B, L]).
    shard: this rank's part under tensor parallelism (spec then holds the rank's heads and MLP
    width), None on one device."""

    kind = "decoder"

    def __init__(self, spec: LlamaSpec, shard: Shard | None = None):
        super().__init__()
        self.spec, self.shard = spec, shard
        # bumped when the weights change in place (merge): graphs recapture
        self.weights_version = 0
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleList(LlamaLayer(spec) for _ in range(spec.layers))
        self.norm = nn.Parameter(torch.ones(spec.hidden))
        self.lm_head = (None if spec.tie_embeddings
                        else nn.Linear(spec.hidden, spec.vocab, bias=False))
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
                    Site(f"{p}.mlp.up_proj", i, "gate_up", s.intermediate, s.intermediate,
                         s.hidden),
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

    # --- forward ----------------------------------------------------------------------------
    def _group(self, hook, i: int, group: str, x):
        """(y, extra) of one fused GEMM with its adapters (models.common.run_group)."""
        linear = getattr(self.layers[i], group)
        return run_group(hook, i, group, linear, x, self.shard,
                         self.shard is not None and group in ROW_PARALLEL)

    def block(self, i: int, x, delta, cos, sin, attention, hook, ops):
        """One decoder layer: (x, delta) -> (x + delta, this layer's output delta); the residual
        add is deferred so that it fuses with the next RMSNorm. A delta is (y, extra): a GEMM
        output and the adapter deltas still to be added to it, or None (models.common.run_group).
        x: [..., H]; cos, sin: [..., 1, hd]; delta (None, None) = nothing to add; ops: the
        step's elementwise kernels (kernels.fused.elementwise)."""
        s, layer = self.spec, self.layers[i]
        lead = x.shape[:-1]
        q_size, kv_size = s.heads * s.head_dim, s.kv_heads * s.head_dim
        x, h = ops.add_rms_norm(x, delta[0], layer.in_norm, s.rms_eps, delta[1])
        qkv, extra = self._group(hook, i, "qkv", h)                          # [..., q+2kv]
        if ops.fused and getattr(attention, "takes_qkv", False):
            # RoPE, the adapter delta and the KV write in one kernel inside the backend.
            att = attention.attend_qkv(i, qkv, cos, sin, s.heads, s.kv_heads, s.head_dim, extra)
        else:
            q, k, v = with_extra(qkv, extra).split([q_size, kv_size, kv_size], dim=-1)
            q = apply_rope(q.view(*lead, s.heads, s.head_dim), cos, sin)     # [..., nH, hd]
            k = apply_rope(k.view(*lead, s.kv_heads, s.head_dim), cos, sin)  # [..., nKV, hd]
            v = v.reshape(*lead, s.kv_heads, s.head_dim)
            att = attention(i, q, k, v)                                      # [..., nH, hd]
        o, extra = self._group(hook, i, "o", att.reshape(*lead, q_size))
        x, h = ops.add_rms_norm(x, o, layer.post_norm, s.rms_eps, extra)
        gate_up, extra = self._group(hook, i, "gate_up", h)                  # [..., 2I]
        return x, self._group(hook, i, "down", ops.silu_mul(gate_up, extra))

    def forward(self, ids, positions, attention, hook=None, rows=None, routes: Routes = TORCH):
        """ids, positions: [T] (the engine's packed tokens) or [B, L]. attention(layer, q, k, v)
        -> [..., nH, hd] with q [..., nH, hd] and k, v [..., nKV, hd] (models.common.
        PaddedAttention, engine.attention.PagedAttention). rows: the tokens that get logits (an
        index or bool mask over the leading dims; the LM head is a large share of a small model's
        FLOPs, so compute only what is used); None = all. Returns logits [..., V]. routes: the
        step's kernels (kernels.routes.choose); the default is the torch ops, as training needs."""
        x = self.embed(ids)                                                  # [..., H]
        ops = elementwise(routes.fused)
        freqs = positions.float()[..., None] * self.inv_freq                 # [..., hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[..., None, :], emb.sin().to(x.dtype)[..., None, :]
        delta = (None, None)
        for i in range(len(self.layers)):
            x, delta = self.block(i, x, delta, cos, sin, attention, hook, ops)
        if rows is not None:
            x, delta = x[rows], tuple(None if d is None else d[rows] for d in delta)
        _, x = ops.add_rms_norm(x, delta[0], self.norm, self.spec.rms_eps, delta[1])
        head = self.embed.weight if self.lm_head is None else self.lm_head.weight
        return dense(x, head)
