"""Confidence intervals for accuracies and for paired differences between two strategies, and the
ranking quality (AUC) of scores."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "auc", "mcnemar_p", "paired_difference", "pass_at_k", "wilson_interval"]


def wilson_interval(correct: int, total: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of an accuracy ``correct / total``; it stays
    inside [0, 1] and is sensible at 0 and at ``total`` correct, where the normal one is not."""
    if total <= 0:
        return (0.0, 1.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k (Chen et al. 2021) from ``n`` samples of which ``c`` are
    correct: the chance that at least one of ``k`` samples drawn without replacement is,
    ``1 - C(n - c, k) / C(n, k)``, computed as a product so that it stays exact for large ``n``.

    >>> pass_at_k(4, 1, 1), pass_at_k(4, 1, 4), round(pass_at_k(5, 2, 2), 4)
    (0.25, 1.0, 0.7)
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mcnemar_p(a: Sequence[bool], b: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired outcomes: only the questions one strategy gets
    right and the other wrong count."""
    if len(a) != len(b):
        raise ValueError("paired outcomes need the same questions")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedDifference:
    """``b``'s accuracy minus ``a``'s on the same questions."""

    difference: float
    #: The 95% paired-bootstrap interval of the difference.
    low: float
    high: float
    #: Exact McNemar p-value.
    p_value: float
    #: Questions only ``a`` / only ``b`` got right.
    only_a: int
    only_b: int
    questions: int


def paired_difference(a: Sequence[bool], b: Sequence[bool], resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """``mean(b) - mean(a)`` with a 95% paired bootstrap interval (questions resampled with
    replacement, both strategies' outcomes kept together) and McNemar's exact test."""
    if len(a) != len(b) or not a:
        raise ValueError("paired outcomes need the same, non-empty list of questions")
    n = len(a)
    diffs = np.array([int(y) - int(x) for x, y in zip(a, b, strict=True)], dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return PairedDifference(
        difference=float(diffs.mean()),
        low=float(low),
        high=float(high),
        p_value=mcnemar_p(a, b),
        only_a=sum(1 for d in diffs if d < 0),
        only_b=sum(1 for d in diffs if d > 0),
        questions=n,
    )


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """The probability that a random positive outscores a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, positive, strict=True) if y]
    neg = [s for s, y in zip(scores, positive, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    ranked = sorted(scores)
    # Midranks: the average 1-based rank of each value among all scores.
    first: dict[float, int] = {}
    count: dict[float, int] = {}
    for i, s in enumerate(ranked, 1):
        first.setdefault(s, i)
        count[s] = count.get(s, 0) + 1
    rank_sum = sum(first[s] + (count[s] - 1) / 2 for s in pos)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
