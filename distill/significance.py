"""When a difference in test accuracy is noise: intervals, paired tests and the naive rates.

A test split is a sample, so each accuracy on it is an estimate: `wilson_interval` gives its 95 %
interval (Wilson's score interval, which stays inside [0, 1] and holds on small splits where the
normal approximation does not). Two models scored on the same rows are compared pairwise, on the
rows where exactly one of them is right (`mcnemar_exact`): that is far more sensitive than
comparing two intervals, since the rows both get right or both get wrong carry no information on
which is better. `majority_rate`, `one_class_models` and `above_majority_p_value` say when a
model is no better than answering the most frequent class for every row.

distill.evaluation stores these numbers in metrics.json; distill.report words them.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest

CONFIDENCE = 0.95  # of every interval
ALPHA = 0.05  # a difference with p >= ALPHA is within noise
SMALL_SPLIT_ROWS = 100  # fewer test rows cannot tell models apart: one accuracy's 95 % interval is up to ±10 points


def wilson_interval(correct: int, rows: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of the accuracy `correct` / `rows`.

    With p = correct / rows and z the normal quantile of (1 + confidence) / 2:
    (p + z²/2n ± z·sqrt(p(1 - p)/n + z²/4n²)) / (1 + z²/n), from scipy's binomtest.
    """
    ci = binomtest(int(correct), int(rows)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(first: np.ndarray, second: np.ndarray) -> dict[str, float]:
    """McNemar's exact test of two models' per-row correctness (boolean (N,) arrays, same rows).

    Only discordant rows count: `wins`, where the first model alone is right, and `losses`, where
    the second alone is. Under "equally good" each discordant row is a fair coin, so the two-sided
    p-value is the binomial test of wins in wins + losses at 1/2 (1 when there are none).

    Returns:
        difference (first's accuracy minus second's), p_value, wins, losses, rows.
    """
    first, second = np.asarray(first, bool), np.asarray(second, bool)
    wins, losses = int((first & ~second).sum()), int((~first & second).sum())
    p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"difference": float(first.mean() - second.mean()), "p_value": float(p), "wins": wins, "losses": losses,
            "rows": len(first)}


def majority_rate(labels: np.ndarray, num_classes: int) -> tuple[int, float]:
    """The most frequent class of `labels` and its share of them: the accuracy of always answering it."""
    counts = np.bincount(labels, minlength=num_classes)
    return int(counts.argmax()), float(counts.max() / counts.sum())


def above_majority_p_value(correct: int, rows: int, rate: float) -> float:
    """One-sided exact binomial p-value that a model with `correct` of `rows` right beats `rate`
    (the majority rate): at >= ALPHA it is no better than always answering the majority class."""
    return float(binomtest(int(correct), int(rows), rate, alternative="greater").pvalue)


def one_class_models(predictions: dict[str, np.ndarray]) -> dict[str, int]:
    """The models (by name) that predict one class for every row, and that class."""
    return {name: int(p[0]) for name, p in predictions.items() if len(p) and (p == p[0]).all()}


def within_noise(p_value: float) -> bool:
    return p_value >= ALPHA


def too_few_rows(rows: int) -> bool:
    return rows < SMALL_SPLIT_ROWS
