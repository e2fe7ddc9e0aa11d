"""training/metrics.py against scikit-learn and scipy (independent implementations)."""

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from uora_rt.training import metrics


@pytest.mark.parametrize("classes,n,seed", [(2, 50, 0), (2, 1043, 1), (3, 200, 2), (5, 77, 3)])
def test_classification_against_sklearn(classes, n, seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, classes, n)
    pred = np.where(rng.random(n) < 0.6, gold, rng.integers(0, classes, n))
    assert metrics.accuracy(pred, gold) == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert metrics.matthews(pred, gold, classes) == pytest.approx(
        matthews_corrcoef(gold, pred), abs=1e-12)
    want_f1 = f1_score(gold, pred) if classes == 2 else f1_score(gold, pred, average="macro")
    assert metrics.f1(pred, gold, classes) == pytest.approx(want_f1, abs=1e-12)


def test_degenerate_predictions():
    gold = [0, 1, 1, 0, 1]
    assert metrics.matthews([1] * 5, gold) == matthews_corrcoef(gold, [1] * 5) == 0.0
    assert metrics.f1([0] * 5, gold) == f1_score(gold, [0] * 5, zero_division=0) == 0.0


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_correlations_against_scipy(seed, ties):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=300)
    y = 0.5 * x + rng.normal(size=300)
    if ties:  # STS-B-like scores on a 0.2 grid: many ties
        y = np.round(np.clip(y + 2.5, 0, 5) * 5) / 5
        x = np.round(x, 1)
    assert metrics.pearson(x, y) == pytest.approx(pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


def test_perplexity():
    m = metrics.language_model_metrics(loss_sum=69.0, tokens=30)
    assert m["loss"] == 2.3 and m["perplexity"] == pytest.approx(math.exp(2.3))
