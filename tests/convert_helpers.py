"""Helpers shared by the tests/test_convert_*.py files: tiny base models saved as HF folders, PEFT
VeRA adapters with non-trivial lambdas, and forwards through PEFT itself (the independent
reference for every conversion)."""

import warnings

import torch
from models_tiny import tiny_bert, tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}
TOKENS = torch.tensor([[3, 17, 42, 5, 88, 1, 60, 9, 33, 71], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]])


def fresh(kind):
    return MODELS[kind]()


def forward(model) -> torch.Tensor:
    """Logits (Llama, GPT-2) or the last hidden state (BERT), no grad."""
    with torch.no_grad():
        return model(input_ids=TOKENS)[0]


def save_base(kind, folder):
    fresh(kind).save_pretrained(str(folder))
    return folder


def peft_vera(kind, folder, *, r, targets, seed=0, save_projection=True, lam_seed=1):
    """A PEFT VeRA adapter on a fresh tiny model, lambdas random (a fresh adapter is a no-op),
    saved to `folder`. Returns (peft_model, its forward)."""
    from peft import VeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # save_projection=False and Conv1D fan_in_fan_out warn
        model = get_peft_model(fresh(kind), VeraConfig(
            r=r, target_modules=targets, projection_prng_key=seed,
            save_projection=save_projection, init_weights=False))
        g = torch.Generator().manual_seed(lam_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "vera_lambda_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        model.save_pretrained(str(folder))
    return model, forward(model)


def peft_load(kind, folder):
    """PeftModel.from_pretrained on a fresh base: PEFT's own reading of a folder we wrote."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(fresh(kind), str(folder)).eval()


def rewrite_safetensors(src, dst, edit):
    """Copies a safetensors file, letting `edit(tensors)` change it."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    edit(tensors)
    save_file(tensors, str(dst), metadata={"format": "pt"})
