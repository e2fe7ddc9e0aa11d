"""The runtime on a CUDA GPU (skipped without one): both shrink routes, the engine's tokens,
bf16, and SmolLM2 real weights against the CPU path and transformers + PEFT."""

import pytest
import torch

import uora_rt
from conftest import MODEL_TOL, assert_close, requires_smollm2
from models_tiny import tiny_llama
from peft_ref import make_adapter, peft_vera_model
from uora_rt.kernels.routes import choose

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture()
def tiny(tmp_path):
    fn = lambda: tiny_llama(num_hidden_layers=3)  # noqa: E731
    fn().save_pretrained(tmp_path / "base")
    ads = [("a", make_adapter(fn, tmp_path / "a.uora", reinit=True, scale=1.0)),
           ("b", make_adapter(fn, tmp_path / "b.uora", seed=2, scale=1.0,
                              targets=("k_proj", "o_proj", "down_proj"))),
           ("c", make_adapter(fn, tmp_path / "c.uora", lam_seed=5, scale=1.0))]
    return fn, tmp_path / "base", ads


@pytest.mark.parametrize("parallel_shrink", [None, False])
def test_gpu_float32_equals_cpu_path_and_engine_tokens_equal(tiny, parallel_shrink):
    fn, base, ads = tiny
    cpu = uora_rt.load(base, adapters=ads)
    gpu = uora_rt.load(base, adapters=ads, device="cuda", slots=8, parallel_shrink=parallel_shrink)
    routes = choose(gpu.kernel_prefs, gpu.device, gpu.dtype, gpu.manager.factor_dtype, 8)
    assert routes.parallel_shrink == (parallel_shrink is None)  # on by default on CUDA
    weights = {id(p): p.data_ptr() for p in gpu.model.parameters()}
    ids = torch.randint(0, 97, (6, 11))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    names = ["a", "b", None, "c", "a", "b"]
    assert_close(gpu.forward(ids, mask, names).logits.cpu(), cpu.forward(ids, mask, names).logits,
                 table=MODEL_TOL)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [9], [3, 3, 3, 3], [8, 1], [4]]
    want = cpu.generate(prompts, adapters=names, max_new_tokens=12)
    got = gpu.generate(prompts, adapters=names, max_new_tokens=12)
    assert [g.tokens for g in got] == [g.tokens for g in want]
    # the base weights are the ones loaded: adapters never copy or replace them
    assert {id(p): p.data_ptr() for p in gpu.model.parameters()} == weights
    # adapters removed and added between requests: new slots, same answers as the CPU
    for rt in (gpu, cpu):
        rt.remove_adapter("c")
        rt.add_adapter(ads[2][1], name="c2")
    names2 = ["c2", "a", "b", None, "c2", "a"]
    assert [g.tokens for g in gpu.generate(prompts, adapters=names2, max_new_tokens=12)] == \
        [g.tokens for g in cpu.generate(prompts, adapters=names2, max_new_tokens=12)]


def test_gpu_bf16_close_to_peft(tiny):
    fn, base, ads = tiny
    gpu = uora_rt.load(base, adapters=ads, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (1, 9))
    for name, path in ads:
        got = gpu.forward(ids, adapters=[name]).logits[0].cpu()
        model = peft_vera_model(fn().to(torch.bfloat16).cuda(), path)
        with torch.no_grad():
            want = model(ids.cuda()).logits[0].float().cpu()
        assert_close(got, want, dtype=torch.bfloat16, table=MODEL_TOL)


@requires_smollm2
def test_smollm2_on_gpu_equals_transformers_peft(tmp_path):
    from transformers import LlamaForCausalLM

    from uora_rt.models.gguf_import import default_base

    folder = default_base("float32")
    fn = lambda: LlamaForCausalLM.from_pretrained(str(folder)).eval()  # noqa: E731
    a = make_adapter(fn, tmp_path / "a.uora", r=32, targets=("q_proj", "v_proj"), scale=0.3,
                     reinit=True)
    rt = uora_rt.load(folder, adapters=[("a", a)], device="cuda")
    prompt = rt.codec.encode_prompt("What is the capital of France?")
    got = rt.forward(torch.tensor([prompt]), adapters=["a"]).logits[0].cpu()
    model = peft_vera_model(fn(), a)
    with torch.no_grad():
        want = model(torch.tensor([prompt])).logits[0]
    assert_close(got, want, table=MODEL_TOL)
    gen = rt.generate(["What is the capital of France?"], adapters=["a"], max_new_tokens=12)[0]
    ref = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                         dtype=torch.long), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    eos = rt.codec.eos_id
    assert gen.tokens == [t for t in ref.tolist() if t != eos][: len(gen.tokens)]
