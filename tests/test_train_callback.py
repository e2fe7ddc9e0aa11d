"""UORACallback with a real transformers Trainer on a tiny Llama: reinit after every optimizer
step (count checked against the rule itself), events in the logs, adapters written."""

import pytest
import torch

import uora_rt
from models_tiny import tiny_llama
from uora_rt.core import format as fmt
from uora_rt.training.inject import shared_state


class Ids(torch.utils.data.Dataset):
    def __init__(self, n):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 97, (n, 12), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_callback_with_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from uora_rt.training import UORACallback

    model = tiny_llama()
    # tau above d_initial: every (layer, index) is below it at every check, so each optimizer
    # step fires layers x r events (lr is far too small to lift |lambda_d| over 0.5).
    uora_rt.inject(model, uora_rt.UORAConfig(r=16, tau=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    callback = UORACallback(save_path=tmp_path / "final.uora")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
                             logging_steps=1, save_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Ids(32), callbacks=[callback])
    trainer.train()
    steps, layers, r = 3, 4, 16
    assert callback.total_events == steps * layers * r
    assert int(shared_state(model).events.sum()) == steps * layers * r
    logged = [h["uora_reinit_events"] for h in trainer.state.log_history
              if "uora_reinit_events" in h and "loss" in h]
    assert logged[:3] == [layers * r, 2 * layers * r, 3 * layers * r]
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters()
               if p.requires_grad)
    final = fmt.load(tmp_path / "final.uora")
    assert int(final.count.sum()) == steps * layers * r
    # Every index fired 3 times in each of the 4 layers: P = 0.5 ** 12.
    assert torch.allclose(final.p, torch.full((r,), 0.5 ** 12))
    ckpt = fmt.load(tmp_path / "run" / "checkpoint-2" / "adapter.uora")
    assert int(ckpt.count.sum()) == 2 * layers * r


def test_callback_refuses_a_model_without_uora(tmp_path):
    from transformers import Trainer, TrainingArguments

    from uora_rt.training import UORACallback

    model = tiny_llama()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Ids(4), callbacks=[UORACallback()])
    with pytest.raises(ValueError, match="has no UORA adapter"):
        trainer.train()
