"""BERT-family encoder (BERT, RoBERTa, MiniLM) in plain PyTorch, one readable page.

Post-LN transformer with absolute positions; q/k/v fused into one GEMM. Pooling is what the
checkpoint declares: a sentence-transformers folder's 1_Pooling config (mean / cls / max, then
Normalize if listed in modules.json), else BERT's pooler (dense + tanh on [CLS]) when its weights
exist, else [CLS].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from uora_rt.models.common import Site, run_group

_ACTS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
         "relu": F.relu}


@dataclass
class BertSpec:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    eps: float
    max_positions: int
    type_vocab: int
    act: str
    position_offset: int  # RoBERTa numbers positions from padding_idx + 1
    pad_id: int

    @classmethod
    def from_config(cls, cfg: dict) -> "BertSpec":
        act = cfg.get("hidden_act", "gelu")
        if act not in _ACTS:
            raise ValueError(f"bert: hidden_act {act!r} is not supported")
        roberta = cfg.get("model_type") in ("roberta", "xlm-roberta")
        pad = cfg.get("pad_token_id", 0) or 0
        return cls(vocab=cfg["vocab_size"], hidden=cfg["hidden_size"],
                   intermediate=cfg["intermediate_size"], layers=cfg["num_hidden_layers"],
                   heads=cfg["num_attention_heads"], eps=cfg.get("layer_norm_eps", 1e-12),
                   max_positions=cfg.get("max_position_embeddings", 512),
                   type_vocab=cfg.get("type_vocab_size", 2), act=act,
                   position_offset=pad + 1 if roberta else 0, pad_id=pad)


def read_pooling(folder) -> tuple[str, bool]:
    """(mode, normalize) declared by a sentence-transformers folder, or ("", False)."""
    folder = Path(folder)
    pool_cfg = folder / "1_Pooling" / "config.json"
    if not pool_cfg.is_file():
        return "", False
    c = json.loads(pool_cfg.read_text())
    mode = ("mean" if c.get("pooling_mode_mean_tokens")
            else "cls" if c.get("pooling_mode_cls_token")
            else "max" if c.get("pooling_mode_max_tokens") else "")
    if not mode:
        raise ValueError(f"{pool_cfg}: pooling mode not supported: {c}")
    modules = folder / "modules.json"
    normalize = modules.is_file() and any(
        m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return mode, normalize


class BertLayer(nn.Module):
    def __init__(self, s: BertSpec):
        super().__init__()
        self.qkv = nn.Linear(s.hidden, 3 * s.hidden)                 # [query | key | value]
        self.attn_out = nn.Linear(s.hidden, s.hidden)
        self.attn_norm = nn.LayerNorm(s.hidden, eps=s.eps)
        self.intermediate = nn.Linear(s.hidden, s.intermediate)
        self.output = nn.Linear(s.intermediate, s.hidden)
        self.out_norm = nn.LayerNorm(s.hidden, eps=s.eps)


class BertModel(nn.Module):
    """forward(ids [B, L], valid [B, L], hook, types [B, L] | None) -> (hidden [B, L, H],
    pooled [B, H]). types: token type ids (the segment of a sentence pair); None = all 0."""

    kind = "encoder"
    _NAMES = {"qkv": None, "attn_out": "attention.output.dense",
              "intermediate": "intermediate.dense", "output": "output.dense"}

    def __init__(self, spec: BertSpec, pooling: str = "", normalize: bool = False,
                 pooler: bool = False):
        super().__init__()
        self.spec = spec
        self.weights_version = 0  # bumped when the weights change in place (merge)
        self.word = nn.Embedding(spec.vocab, spec.hidden)
        self.position = nn.Embedding(spec.max_positions, spec.hidden)
        self.token_type = nn.Embedding(spec.type_vocab, spec.hidden)
        self.emb_norm = nn.LayerNorm(spec.hidden, eps=spec.eps)
        self.layers = nn.ModuleList(BertLayer(spec) for _ in range(spec.layers))
        self.pooling, self.normalize = pooling, normalize
        self.pooler = nn.Linear(spec.hidden, spec.hidden) if pooler and not pooling else None

    def sites(self) -> list[Site]:
        s, out = self.spec, []
        for i in range(s.layers):
            p = f"encoder.layer.{i}"
            out += [Site(f"{p}.attention.self.{n}", i, "qkv", j * s.hidden, s.hidden, s.hidden)
                    for j, n in enumerate(("query", "key", "value"))]
            out += [Site(f"{p}.attention.output.dense", i, "attn_out", 0, s.hidden, s.hidden),
                    Site(f"{p}.intermediate.dense", i, "intermediate", 0, s.intermediate, s.hidden),
                    Site(f"{p}.output.dense", i, "output", 0, s.hidden, s.intermediate)]
        return out

    def group_linear(self, layer: int, group: str) -> nn.Linear:
        return getattr(self.layers[layer], group)

    @staticmethod
    def canonical_names(tensors: dict) -> dict:
        """Strips the `bert.`/`roberta.` prefix and renames legacy LayerNorm gamma/beta."""
        out = {}
        for k, v in tensors.items():
            for p in ("bert.", "roberta."):
                if k.startswith(p):
                    k = k[len(p):]
            out[k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                           "LayerNorm.bias")] = v
        return out

    def load_checkpoint(self, tensors: dict[str, torch.Tensor]) -> None:
        t = self.canonical_names(tensors)

        def ln(mod, name):
            mod.weight.copy_(t[f"{name}.weight"])
            mod.bias.copy_(t[f"{name}.bias"])

        with torch.no_grad():
            self.word.weight.copy_(t["embeddings.word_embeddings.weight"])
            self.position.weight.copy_(t["embeddings.position_embeddings.weight"])
            self.token_type.weight.copy_(t["embeddings.token_type_embeddings.weight"])
            ln(self.emb_norm, "embeddings.LayerNorm")
            for i, layer in enumerate(self.layers):
                p = f"encoder.layer.{i}"
                sa = f"{p}.attention.self"
                layer.qkv.weight.copy_(torch.cat([t[f"{sa}.{n}.weight"]
                                                  for n in ("query", "key", "value")]))
                layer.qkv.bias.copy_(torch.cat([t[f"{sa}.{n}.bias"]
                                                for n in ("query", "key", "value")]))
                ln(layer.attn_out, f"{p}.attention.output.dense")
                ln(layer.attn_norm, f"{p}.attention.output.LayerNorm")
                ln(layer.intermediate, f"{p}.intermediate.dense")
                ln(layer.output, f"{p}.output.dense")
                ln(layer.out_norm, f"{p}.output.LayerNorm")
            if self.pooler is not None:
                ln(self.pooler, "pooler.dense")

    def forward(self, ids, valid, hook=None, types=None):
        s = self.spec
        b, n = ids.shape
        if s.position_offset:
            positions = torch.cumsum(valid.long(), 1) * valid.long() + s.pad_id
        else:
            positions = torch.arange(n, device=ids.device)[None].expand(b, n)
        types = torch.zeros_like(ids) if types is None else types
        x = self.word(ids) + self.position(positions) + self.token_type(types)
        x = self.emb_norm(x)                                                 # [B, L, H]
        mask = valid[:, None, None, :]                                       # keys only
        hd = s.hidden // s.heads
        # An encoder's routes never defer an adapter delta (no consumer kernel would add it), so
        # each group's second result, the pending delta, is always None here.
        for i, layer in enumerate(self.layers):
            qkv, _ = run_group(hook, i, "qkv", layer.qkv, x)                 # [B, L, 3H]
            q, k, v = (t.view(b, n, s.heads, hd).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            att = att.transpose(1, 2).reshape(b, n, s.hidden)
            a, _ = run_group(hook, i, "attn_out", layer.attn_out, att)
            x = layer.attn_norm(a + x)
            h, _ = run_group(hook, i, "intermediate", layer.intermediate, x)
            h = _ACTS[s.act](h)
            o, _ = run_group(hook, i, "output", layer.output, h)
            x = layer.out_norm(o + x)
        return x, self.pool(x, valid)

    def pool(self, x, valid):
        if self.pooling == "mean":
            m = valid[..., None].to(x.dtype)
            pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        elif self.pooling == "max":
            pooled = x.masked_fill(~valid[..., None], float("-inf")).max(1).values
        elif self.pooler is not None:
            pooled = torch.tanh(self.pooler(x[:, 0]))
        else:
            pooled = x[:, 0]
        return F.normalize(pooled, dim=-1) if self.normalize else pooled
