"""Paired comparisons of pass@1 on the same problems: is a difference more than noise?

Two evaluations of the same problems are paired: most problems are solved by both or by neither, and only the
discordant ones carry information. A difference of two problems out of 164 is reported as a gain only when the
interval of the difference excludes zero.

- ``paired_bootstrap``: resample problems with replacement (the same indices for both sides), 95% percentile
  interval of the difference of means (Efron & Tibshirani 1993); works for per-problem pass@1 estimates in [0, 1]
  (several samples per problem) as well as 0/1 verdicts.
- ``mcnemar_exact``: the exact (binomial) McNemar test on the discordant pairs, for 0/1 verdicts (McNemar 1947);
  the p-value of "neither side is better".
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class PairedResult:
    n: int
    before: float  # mean pass@1
    after: float
    difference: float  # after - before
    ci_low: float
    ci_high: float
    confidence: float
    only_before: int | None  # problems solved before but not after (0/1 verdicts)
    only_after: int | None
    mcnemar_p: float | None

    @property
    def significant(self) -> bool:
        """The interval of the difference excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}

    def describe(self) -> str:
        verdict = ("better" if self.ci_low > 0 else "worse") if self.significant else "no significant difference"
        extra = ""
        if self.only_before is not None:
            extra = (f"; solved only before: {self.only_before}, only after: {self.only_after}, exact McNemar "
                     f"p = {self.mcnemar_p:.3g}")
        return (f"pass@1 {self.before:.2%} -> {self.after:.2%} on {self.n} problems: difference "
                f"{self.difference:+.2%} ({self.confidence:.0%} CI {self.ci_low:+.2%} to {self.ci_high:+.2%}), "
                f"{verdict}{extra}")


def paired_bootstrap(before: np.ndarray, after: np.ndarray, *, confidence: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile interval of mean(after - before) over problems resampled with replacement."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if before.shape != after.shape or before.ndim != 1 or len(before) == 0:
        raise ValueError(f"paired scores need two equal, non-empty 1-D arrays, got {before.shape} and {after.shape}")
    diff = after - before
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # bounded memory: 1000 x n indices at a time
        idx = rng.integers(0, len(diff), size=(min(1000, resamples - start), len(diff)))
        means[start:start + len(idx)] = diff[idx].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mcnemar_exact(only_before: int, only_after: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | Binomial(b + c, 1/2))."""
    n = only_before + only_after
    if n == 0:
        return 1.0
    k = min(only_before, only_after)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def compare_paired(before: dict[str, float], after: dict[str, float], *, confidence: float = 0.95,
                   resamples: int = 10_000, seed: int = 0) -> PairedResult:
    """Per-problem pass@1 (task id -> value in [0, 1]) of two evaluations, on the problems both scored."""
    common = sorted(set(before) & set(after))
    if not common:
        raise ValueError("the two evaluations share no problems; compare runs of the same task")
    b = np.array([before[t] for t in common], dtype=float)
    a = np.array([after[t] for t in common], dtype=float)
    low, high = paired_bootstrap(b, a, confidence=confidence, resamples=resamples, seed=seed)
    binary = bool(np.isin(b, (0.0, 1.0)).all() and np.isin(a, (0.0, 1.0)).all())
    only_b = int(((b == 1) & (a == 0)).sum()) if binary else None
    only_a = int(((a == 1) & (b == 0)).sum()) if binary else None
    return PairedResult(n=len(common), before=float(b.mean()), after=float(a.mean()), difference=float((a - b).mean()),
                        ci_low=low, ci_high=high, confidence=confidence, only_before=only_b, only_after=only_a,
                        mcnemar_p=mcnemar_exact(only_b, only_a) if binary else None)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (Wilson 1927): honest near 0, where pass@1 of small models lives."""
    if n <= 0:
        raise ValueError("n must be positive")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
