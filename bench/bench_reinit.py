"""Reinitialization cost per training step vs the step itself (goal: <= 1%).

Model: all-MiniLM-L6-v2 (real weights), UORA r=256 on query/value (12 layers), batch 32 of the
topic task. Times the full step (forward, backward, AdamW) and reinit_step alone, with no event
firing (tau=1e-5, the default) and with many firing (tau=0.09).

python bench/bench_reinit.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402
import torch  # noqa: E402

import uora_rt  # noqa: E402
from uora_rt.models import assets
from uora_rt.training import tasks  # noqa: E402


def main():
    from tokenizers import Tokenizer
    from transformers import BertModel

    d = assets.minilm_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.enable_padding(pad_id=0)
    texts, labels = tasks.topic_sentences(32, seed=0)
    enc = tok.encode_batch(texts)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    y = torch.tensor(labels)
    records = []
    for tau in (1e-5, 0.09):
        torch.manual_seed(0)
        model = BertModel.from_pretrained(str(d), add_pooling_layer=False).train()
        uora_rt.inject(model, uora_rt.UORAConfig(r=256, target_modules=["query", "value"], tau=tau))
        head = torch.nn.Linear(384, 3)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]
                                + list(head.parameters()), lr=1e-2)
        events = []

        def step():
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
            loss = torch.nn.functional.cross_entropy(head(h), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def reinit():
            events.append(uora_rt.reinit_step(model))

        t_step = common.median_time(step, repeats=7)
        t_reinit = common.median_time(reinit, repeats=50)
        rec = {"tau": tau, "r": 256, "layers": 12, "batch": 32, "seq": int(ids.shape[1]),
               "step_s": t_step, "reinit_s": t_reinit, "ratio": t_reinit / t_step,
               "events_per_call": sum(events) / len(events)}
        records.append(rec)
        print(f"tau {tau:g}: step {t_step * 1e3:7.1f} ms   reinit {t_reinit * 1e6:7.1f} us   "
              f"ratio {100 * rec['ratio']:.3f}%   events/call {rec['events_per_call']:.1f}")
    common.write("reinit_cpu", records)


if __name__ == "__main__":
    main()
