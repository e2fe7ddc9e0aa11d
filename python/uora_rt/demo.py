"""The main job: train a UORA adapter on the packaged all-MiniLM-L6-v2 and save it.

Only the UORA vectors learn (the 3-way topic head is a frozen random projection); the adapter
file holds the seed, the reinit record and the vectors.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm import tqdm

import uora_rt
from uora_rt import assets, tasks


def run(args) -> int:
    from tokenizers import Tokenizer
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    d = assets.minilm_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    model = BertModel.from_pretrained(str(d), add_pooling_layer=False)
    config = uora_rt.UORAConfig(r=64, target_modules=["query", "value"], tau=0.03)
    uora_rt.inject(model, config)
    head = torch.nn.Linear(384, len(tasks.LABELS)).requires_grad_(False)

    def logits(texts):
        enc = tok.encode_batch(texts)
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        h = model(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        return head(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)) * 20

    train_x, train_y = tasks.topic_sentences(200, seed=1)
    val_x, val_y = tasks.topic_sentences(90, seed=2)

    def accuracy():
        model.eval()
        with torch.no_grad():
            acc = (logits(val_x).argmax(-1) == torch.tensor(val_y)).float().mean().item()
        model.train()
        return acc

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2,
                            weight_decay=0.0)
    print(f"UORA r={config.r} on MiniLM query/value: "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters")
    print(f"validation accuracy before: {accuracy():.2f} (chance {1 / len(tasks.LABELS):.2f})")
    events, t0 = 0, time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for _ in bar:
        idx = torch.randint(0, len(train_x), (32,))
        loss = torch.nn.functional.cross_entropy(logits([train_x[i] for i in idx]),
                                                 torch.tensor([train_y[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        events += uora_rt.reinit_step(model)
        bar.set_postfix(loss=f"{loss.item():.3f}", reinit_events=events)
    print(f"validation accuracy after:  {accuracy():.2f}  ({time.perf_counter() - t0:.1f} s, "
          f"{events} reinit events)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "minilm-topics.uora"
    uora_rt.save_adapter(model, path)
    print(f"saved {path} ({path.stat().st_size:,} bytes)")
    return 0
