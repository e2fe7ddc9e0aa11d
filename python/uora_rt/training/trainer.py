"""Training UORA adapters on the runtime's own model (no transformers needed).

The runtime's models call an adapter hook after every fused GEMM; for training that hook adds a
differentiable UORA delta per adapted site, with the same shared state (A, B, reinit record) and
reinit op as `uora_rt.inject`. The result is an ordinary `.uora` adapter for that base.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from uora_rt.core import format as fmt
from uora_rt.core.config import UORAConfig
from uora_rt.training.inject import reinit_step, to_adapter
from uora_rt.training.layers import UORAShared
from uora_rt.models.common import AdapterHook, PaddedAttention
from uora_rt.core.projections import ALGORITHM, ProjectionSpec, check_family


class SiteAdapter(nn.Module):
    """The trainable vectors of one adapted site (what UORALinear holds, minus the base layer)."""

    def __init__(self, site, shared: UORAShared, d_initial: float):
        super().__init__()
        self.site, self.out_features, self.in_features = site, site.out, site.inp
        self.lambda_b = nn.Parameter(torch.zeros(site.out, device=shared.A.device))
        self.lambda_d = nn.Parameter(torch.full((shared.spec.r,), float(d_initial),
                                                device=shared.A.device))
        object.__setattr__(self, "shared", shared)

    def delta(self, x2d):
        h = F.linear(x2d.float(), self.shared.A[:, : self.in_features]) * self.lambda_d
        return F.linear(h, self.shared.B[: self.out_features]) * self.lambda_b


class TrainingHook(nn.Module, AdapterHook):
    """An adapter hook with trainable UORA vectors for the sites `config.target_modules` names."""

    def __init__(self, model, config: UORAConfig):
        super().__init__()
        targets = config.target_modules or ["q_proj", "v_proj"]
        sites = [s for s in model.sites()
                 if (re.fullmatch(targets, s.name) if isinstance(targets, str)
                     else any(s.name == t or s.name.endswith("." + t) for t in targets))]
        if not sites:
            raise ValueError(f"target_modules={targets!r} matched none of the model's sites")
        spec = ProjectionSpec(ALGORITHM, config.seed, config.r, max(s.inp for s in sites),
                              max(s.out for s in sites))
        check_family(spec.seed, spec.r, spec.max_in, spec.max_out)
        device = next(model.parameters()).device
        shared = UORAShared(config, spec, [s.name for s in sites], device)
        self.adapters = nn.ModuleList(SiteAdapter(s, shared, config.d_initial) for s in sites)
        shared.layers.extend(self.adapters)
        self.adapters[0].add_module("uora_shared", shared)
        self.by_group: dict = {}
        for a in self.adapters:
            self.by_group.setdefault((a.site.layer, a.site.group), []).append(a)

    def apply(self, layer, group, x2d, y2d):
        for a in self.by_group.get((layer, group), ()):
            cols = y2d[:, a.site.col: a.site.col + a.site.out]
            cols.add_(a.delta(x2d).to(y2d.dtype))  # in place on the GEMM output; autograd-safe


def chat_batch(codec, pairs, device):
    """(prompt, response) pairs -> ids, valid, labels [B, L] (loss on response + end token)."""
    seqs, labels = [], []
    end = codec.special.get("eos_token")
    for prompt, response in pairs:
        p = codec.encode_prompt(prompt)
        r = codec.tok.encode(response, add_special_tokens=False).ids
        r = r + ([codec.eos_id] if end and codec.eos_id is not None else [])
        seqs.append(p + r)
        labels.append([-100] * len(p) + r)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), codec.pad_id, dtype=torch.long)
    lab = torch.full_like(ids, -100)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)], lab[i, : len(s)], valid[i, : len(s)] = (
            torch.tensor(s), torch.tensor(l), True)
    return ids.to(device), valid.to(device), lab.to(device)


def train_chat_adapter(rt, pairs, config: UORAConfig, steps=20, lr=5e-2, batch_size=8, seed=0,
                       desc="training") -> fmt.Adapter:
    """Supervised fine-tuning of a UORA adapter on (prompt, response) pairs, on rt's decoder.
    Returns the adapter (add it with rt.add_adapter(adapter, name) or save it with format.save)."""
    model = rt.model
    if model.kind != "decoder" or rt.codec is None:
        raise ValueError("train_chat_adapter needs a decoder base with a tokenizer")
    hook = TrainingHook(model, config)
    params = [p for p in hook.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for _ in bar:
        pick = torch.randint(0, len(pairs), (batch_size,), generator=g).tolist()
        ids, valid, labels = chat_batch(rt.codec, [pairs[i] for i in pick], rt.device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        target = labels[:, 1:]
        select = torch.zeros_like(valid)
        select[:, :-1] = target != -100  # logits only where a next-token label exists
        logits = model(ids, positions, PaddedAttention(valid), hook, rows=select)  # [N, V]
        loss = F.cross_entropy(logits.float(), target[target != -100])
        opt.zero_grad()
        loss.backward()
        opt.step()
        reinit_step(hook)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return to_adapter(hook, (rt.config.get("architectures") or ["?"])[0])
