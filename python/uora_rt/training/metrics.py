"""Evaluation metrics, in plain torch (the command line needs no scikit-learn or scipy).

GLUE's definitions: accuracy; F1 of class 1 for two classes (macro F1 for more); Matthews
correlation (the multi-class form, as scikit-learn computes it); Pearson and Spearman correlation
(ties get their average rank).
"""

from __future__ import annotations

import math

import torch


def _as_tensor(x, dtype):
    return torch.as_tensor(x, dtype=dtype).reshape(-1)


def accuracy(pred, gold) -> float:
    pred, gold = _as_tensor(pred, torch.long), _as_tensor(gold, torch.long)
    return float((pred == gold).double().mean())


def confusion(pred, gold, classes: int) -> torch.Tensor:
    """[gold, pred] counts, float64."""
    pred, gold = _as_tensor(pred, torch.long), _as_tensor(gold, torch.long)
    flat = torch.bincount(gold * classes + pred, minlength=classes * classes)
    return flat.reshape(classes, classes).double()


def f1(pred, gold, classes: int = 2) -> float:
    """Binary: F1 of class 1 (GLUE's MRPC F1). More classes: the unweighted mean over classes."""
    c = confusion(pred, gold, classes)
    tp = c.diag()
    precision_den, recall_den = c.sum(0), c.sum(1)
    per_class = torch.where(precision_den + recall_den > 0,
                            2 * tp / (precision_den + recall_den).clamp(min=1e-300),
                            torch.zeros_like(tp))
    return float(per_class[1] if classes == 2 else per_class.mean())


def matthews(pred, gold, classes: int = 2) -> float:
    """Matthews correlation coefficient (Gorodkin's multi-class form); 0 when undefined."""
    c = confusion(pred, gold, classes)
    t, p = c.sum(1), c.sum(0)          # true and predicted counts per class
    n, correct = c.sum(), c.diag().sum()
    cov = correct * n - (t * p).sum()
    den = math.sqrt(float(n * n - (p * p).sum())) * math.sqrt(float(n * n - (t * t).sum()))
    return float(cov) / den if den > 0 else 0.0


def pearson(x, y) -> float:
    x, y = _as_tensor(x, torch.float64), _as_tensor(y, torch.float64)
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n, ties averaged."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(1, len(x) + 1, dtype=x.dtype)
    values, inverse = torch.unique(x, return_inverse=True)
    total = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, ranks)
    count = torch.zeros(len(values), dtype=x.dtype).index_add_(0, inverse, torch.ones_like(x))
    return (total / count)[inverse]


def spearman(x, y) -> float:
    x, y = _as_tensor(x, torch.float64), _as_tensor(y, torch.float64)
    return pearson(_ranks(x), _ranks(y))


def classification_metrics(pred, gold, classes: int) -> dict:
    out = {"accuracy": accuracy(pred, gold), "mcc": matthews(pred, gold, classes)}
    out["f1" if classes == 2 else "macro_f1"] = f1(pred, gold, classes)
    return out


def regression_metrics(pred, gold) -> dict:
    p, g = _as_tensor(pred, torch.float64), _as_tensor(gold, torch.float64)
    return {"pearson": pearson(p, g), "spearman": spearman(p, g),
            "mse": float(((p - g) ** 2).mean())}


def language_model_metrics(loss_sum: float, tokens: int) -> dict:
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
