"""A real fine-tune: all-MiniLM-L6-v2 (real weights) with UORA on query/value, on a constructed
3-topic task. The classifier head is a frozen random projection, so only the UORA vectors can
learn the task."""

import pytest
import torch

import uora_rt
from conftest import requires_minilm
from uora_rt.models import assets
from uora_rt.training import tasks

pytestmark = [pytest.mark.slow, requires_minilm]


def load_minilm():
    from tokenizers import Tokenizer
    from transformers import BertModel

    d = assets.minilm_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    tok.enable_truncation(32)
    return tok, BertModel.from_pretrained(str(d), add_pooling_layer=False)


def embed(model, tok, texts):
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask[..., None].float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # the model's pooling


def test_minilm_finetune_learns_fires_reinit_and_roundtrips(tmp_path):
    torch.manual_seed(0)
    tok, model = load_minilm()
    model.train()
    uora_rt.inject(model, uora_rt.UORAConfig(r=64, target_modules=["query", "value"], tau=0.03))
    head = torch.nn.Linear(384, 3)
    head.requires_grad_(False)
    train_x, train_y = tasks.topic_sentences(200, seed=1)
    val_x, val_y = tasks.topic_sentences(90, seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2,
                            weight_decay=0.0)

    def accuracy():
        model.eval()
        with torch.no_grad():
            pred = head(embed(model, tok, val_x)).argmax(-1)
        model.train()
        return (pred == torch.tensor(val_y)).float().mean().item()

    acc_before, losses, events = accuracy(), [], 0
    for _ in range(60):
        idx = torch.randint(0, len(train_x), (32,))
        logits = head(embed(model, tok, [train_x[i] for i in idx])) * 20
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([train_y[i] for i in idx]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        events += uora_rt.reinit_step(model)
        losses.append(loss.item())
    acc_after = accuracy()
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert acc_after >= 0.85 > acc_before + 0.3  # chance is 1/3
    assert events > 0

    path = tmp_path / "topics.uora"
    uora_rt.save_adapter(model, path)
    assert path.stat().st_size < 100_000  # seed + record + vectors only
    _, fresh = load_minilm()
    uora_rt.load_adapter(fresh, path)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(embed(fresh, tok, val_x), embed(model, tok, val_x))
