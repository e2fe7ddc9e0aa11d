"""The compared methods on transformers models, each returning what `loop.fit` trains:
UORA (uora_rt.inject), UORA with reinit off (tau = 0: VeRA with UORA's orthogonal projections),
VeRA and LoRA (PEFT), full fine-tuning, and head only (encoder frozen, in eval mode).

Every method adapts query/value (q_proj/v_proj for the decoder) and, for encoders, trains the same
mean-pooling linear head (uora_rt.training.heads.TaskHead) at its own learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

METHODS = ("uora", "uora_noreinit", "vera", "lora", "full", "head")
ENCODER_TARGETS = ["query", "value"]
DECODER_TARGETS = ["q_proj", "v_proj"]


@dataclass
class Built:
    model: torch.nn.Module
    params: list                     # the method's trainable parameters (head excluded)
    reinit: Callable | None          # UORA's reinit step (device tensor of events)
    train_modules: list              # what train(mode) switches (dropout)
    adapter_params: int


def build(method: str, model: torch.nn.Module, r: int, seed: int, targets: list[str]) -> Built:
    import uora_rt

    if method in ("uora", "uora_noreinit"):
        tau = 0.0 if method == "uora_noreinit" else 1e-5   # |lambda| < 0 never holds
        uora_rt.inject(model, uora_rt.UORAConfig(r=r, target_modules=targets, seed=seed, tau=tau))
        reinit = (lambda: uora_rt.reinit_step(model, sync=False)) if tau > 0 else None
        built = Built(model, [p for p in model.parameters() if p.requires_grad], reinit, [model], 0)
    elif method in ("vera", "lora"):
        from peft import LoraConfig, VeraConfig, get_peft_model

        torch.manual_seed(seed)  # LoRA's A init
        cfg = (VeraConfig(r=r, target_modules=targets, projection_prng_key=seed, vera_dropout=0.0)
               if method == "vera" else
               LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0))
        model = get_peft_model(model, cfg)
        built = Built(model, [p for p in model.parameters() if p.requires_grad], None, [model], 0)
    elif method == "full":
        model.requires_grad_(True)
        built = Built(model, list(model.parameters()), None, [model], 0)
    elif method == "head":
        model.requires_grad_(False)
        model.eval()
        built = Built(model, [], None, [], 0)   # never switched to train mode: no dropout
    else:
        raise ValueError(f"unknown method {method!r}; known: {METHODS}")
    built.adapter_params = sum(p.numel() for p in built.params)
    return built


def load_encoder(device):
    from transformers import BertModel

    from uora_rt.models.assets import minilm_dir

    # float32 whatever the checkpoint holds (a float16 copy loads as float16 in recent
    # transformers, and AdamW on float16 weights breaks full fine-tuning)
    model = BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    return model.to(device=device, dtype=torch.float32)


def load_decoder(device):
    from transformers import LlamaForCausalLM

    from uora_rt.runtime import resolve_base

    folder = resolve_base("smollm2")
    model = LlamaForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    return model.to(device), folder
