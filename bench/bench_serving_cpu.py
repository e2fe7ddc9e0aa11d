"""CPU serving benchmark on SmolLM2-135M-Instruct (float32): one forward of a 16 x 64 batch.

Measured in one process, same inputs:
  transformers base | uora_rt without adapters | uora_rt with 1, 4, 16 distinct UORA adapters
  (r=64 on q/v; with and without reinit, i.e. Q halves on/off) | PEFT LoRA r=16 on q/v with
  1, 4, 16 distinct adapters mixed through `adapter_names`.
Goals: 16 distinct adapters <= 1.05x our no-adapter forward; our no-adapter forward no
slower than transformers.

python bench/bench_serving_cpu.py [--repeats 9]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt.models.gguf_import import default_base  # noqa: E402

BATCH, LENGTH, R = 16, 64, 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    folder = default_base("float32")
    rt = uora_rt.load(folder)
    for i in range(16):
        rt.add_adapter(common.random_adapter(rt, i, R), name=f"plain{i}")
        rt.add_adapter(common.random_adapter(rt, 100 + i, R, reinit=True), name=f"reinit{i}")
    ids = torch.randint(0, rt.model.spec.vocab, (BATCH, LENGTH),
                        generator=torch.Generator().manual_seed(0))
    hf = LlamaForCausalLM.from_pretrained(str(folder)).eval()
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(str(folder)).eval(),
                          LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
                          adapter_name="l0")
    for i in range(1, 16):
        lora.add_adapter(f"l{i}", LoraConfig(r=16, lora_alpha=16,
                                             target_modules=["q_proj", "v_proj"]))
    lora.eval()

    def names(prefix, distinct):
        return [f"{prefix}{i % distinct}" for i in range(BATCH)]

    runs = {"transformers base": lambda: hf(ids),
            "uora_rt, no adapters": lambda: rt.forward(ids)}
    for d in (1, 4, 16):
        runs[f"uora_rt, {d} distinct adapters"] = \
            lambda d=d: rt.forward(ids, adapters=names("plain", d))
    for d in (1, 16):
        runs[f"uora_rt, {d} distinct, with reinit (Q halves)"] = \
            lambda d=d: rt.forward(ids, adapters=names("reinit", d))
    for d in (1, 4, 16):
        runs[f"PEFT LoRA r16, {d} distinct (adapter_names)"] = \
            lambda d=d: lora(input_ids=ids, adapter_names=names("l", d))
    with torch.no_grad():
        times = common.interleaved_medians(runs, repeats=args.repeats)
    ours, base_hf = times["uora_rt, no adapters"], times["transformers base"]
    records = []
    print(f"SmolLM2-135M float32, batch {BATCH} x {LENGTH} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'setup':48} {'seconds':>8} {'vs ours, no adapters':>21} {'vs transformers':>16}")
    for label, t in times.items():
        records.append({"setup": label, "seconds": t, "vs_ours_base": t / ours,
                        "vs_transformers": t / base_hf, "batch": BATCH, "length": LENGTH, "r": R})
        print(f"{label:48} {t:8.3f} {t / ours:20.3f}x {t / base_hf:15.3f}x")
    common.write("serving_cpu", records)


if __name__ == "__main__":
    main()
