"""E2E generation and scoring: greedy decoding with the chat template, multi-reference BLEU
(sacrebleu, its default 13a tokenization) and ROUGE-L (rouge-score, F-measure, the best reference
per MR, stemmed). The challenge's official script (NIST BLEU with its own tokenization) gives
somewhat different numbers; compare methods with each other, not with its leaderboard."""

from __future__ import annotations

import torch

import glue


@torch.no_grad()
def generate(model, codec, prompts, device, batch_size=32, max_new_tokens=64):
    outs = []
    eos = codec.eos_id
    for start in range(0, len(prompts), batch_size):
        enc = [codec.encode_prompt(p) for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), codec.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, e in enumerate(enc):  # left padding: every prompt ends where generation starts
            ids[i, width - len(e):] = torch.tensor(e)
            mask[i, width - len(e):] = 1
        with torch.autocast(torch.device(device).type, torch.bfloat16,
                            enabled=str(device).startswith("cuda")):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=codec.pad_id)
        for row in gen[:, width:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            outs.append(codec.decode(row).strip())
    return outs


def score(hyps, refs):
    import sacrebleu
    from rouge_score import rouge_scorer

    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(width)]
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = sum(scorer.score_multi(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    return {"bleu": bleu, "rouge_l": 100 * rouge, "mrs": len(hyps),
            "references": sum(len(r) for r in refs)}


def generate_and_score(model, codec, mrs, device):
    prompts = [glue.E2E_PROMPT.format(mr=mr) for mr, _ in mrs]
    hyps = generate(model, codec, prompts, device)
    refs = [r for _, r in mrs]
    samples = [{"mr": mr, "output": h, "reference": r[0]} for (mr, r), h in zip(mrs, hyps)]
    return score(hyps, refs), samples
