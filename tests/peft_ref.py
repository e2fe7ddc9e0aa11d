"""An outside reference for UORA adapters: PEFT's VeRA with our projections written into it.

UORA's forward is VeRA's with different (frozen) A and B, so PEFT VeRA with
save_projection=True, A = P A0 + (1-P) QA and B = P B0 + (1-P) QB, and the same lambdas computes
exactly the adapter a `.uora` file describes, with code that is not ours.
"""

import torch

import uora_rt
from uora_rt.core import format as fmt
from uora_rt.kernels import ops
from uora_rt.training.inject import adapter_layers


def make_adapter(model_fn, path, r=16, targets=("q_proj", "v_proj"), seed=0, lam_seed=1,
                 scale=0.5, reinit=False):
    """Trains nothing: injects UORA into a fresh base, sets random lambdas (and, with reinit,
    fires some reinit events so P < 1), saves a `.uora` file and returns its path."""
    model = model_fn()
    uora_rt.inject(model, uora_rt.UORAConfig(r=r, target_modules=list(targets), seed=seed,
                                             tau=0.2 if reinit else 1e-5))
    g = torch.Generator().manual_seed(lam_seed)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            layer.lambda_b.copy_(torch.randn(layer.lambda_b.shape, generator=g) * scale)
            layer.lambda_d.copy_(torch.randn(layer.lambda_d.shape, generator=g) * scale)
    if reinit:
        assert uora_rt.reinit_step(model) > 0
    uora_rt.save_adapter(model, path)
    return path


def peft_vera_model(base_model, adapter_path):
    """base_model (a transformers model) wrapped by PEFT VeRA carrying the `.uora` adapter."""
    from peft import VeraConfig, get_peft_model

    ad = fmt.load(adapter_path)
    spec = ad.projection
    a0, b0, qa, qb = uora_rt.projections(spec.seed, spec.r, spec.max_in, spec.max_out)
    a, b = ops.mix_projections(a0, qa, b0, qb, ad.p)
    names = dict(base_model.named_modules())
    targets = [t if t in names else next(n for n in names if n.endswith("." + t))
               for t in ad.targets]
    cfg = VeraConfig(r=spec.r, target_modules=targets, save_projection=True, init_weights=False,
                     projection_prng_key=spec.seed)
    peft_model = get_peft_model(base_model, cfg)
    with torch.no_grad():
        peft_model.base_model.vera_A["default"].copy_(a)
        peft_model.base_model.vera_B["default"].copy_(b)
        for t, full in zip(ad.targets, targets):
            layer = peft_model.base_model.model.get_submodule(full)
            layer.vera_lambda_b["default"].copy_(ad.lambda_b[t])
            layer.vera_lambda_d["default"].copy_(ad.lambda_d[t])
    return peft_model.eval()
