"""The statistics of a comparison over seeds and users (sims/compare.py).

Over seeds, per strategy: the mean of a per-seed score with its 95% t-interval (Student's t with
n - 1 degrees of freedom; n/a with one seed). Over users, against the baseline: each user's paired
difference (positive = better, :func:`fedpeft.learning.metrics.gain`) averaged over seeds; wins, ties and
losses; the Wilcoxon signed-rank test across users (scipy; zero differences dropped, as
scipy's default; p = 1 when every difference is zero); and the share of users *hurt*, worse by
more than one test example's worth (1 / that user's number of test examples: for accuracy,
exactly one more example wrong).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedpeft.learning.metrics import gain

TIE = 1e-12  # differences this small are ties (sums of k / n_test in floating point)


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, lower, upper) of the 95% t-interval of the mean; the bounds are NaN for one value."""
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    mean = float(arr.mean()) if arr.size else math.nan
    if arr.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.975, arr.size - 1) * arr.std(ddof=1) / math.sqrt(arr.size))
    return mean, mean - half, mean + half


def paired_differences(metric: str, scores: Sequence[Mapping[str, float]], baseline: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per user, ``gain(metric, score, baseline score)`` averaged over seeds (``scores[i]`` and
    ``baseline[i]``: seed i's per-user scores); users scored under both in every seed."""
    users = set.intersection(*[set(s) & set(b) for s, b in zip(scores, baseline, strict=True)]) if scores else set()
    return {u: float(np.mean([gain(metric, s[u], b[u]) for s, b in zip(scores, baseline, strict=True)])) for u in sorted(users)}


def paired_stats(diffs: Mapping[str, float], n_test: Mapping[str, int]) -> dict[str, Any]:
    """Wins, ties, losses, the mean difference, Wilcoxon's p and the share of users hurt."""
    from scipy import stats

    d = np.array([diffs[u] for u in sorted(diffs)], dtype=float)
    if d.size == 0:
        return {"users": 0, "mean_diff": math.nan, "wins": 0, "ties": 0, "losses": 0, "wilcoxon_p": math.nan,
                "hurt_share": math.nan}
    nonzero = np.abs(d) > TIE
    p = float(stats.wilcoxon(d[nonzero]).pvalue) if nonzero.any() else 1.0
    hurt = [diffs[u] < -1.0 / n_test[u] - TIE for u in sorted(diffs)]
    return {"users": int(d.size), "mean_diff": float(d.mean()), "wins": int((d > TIE).sum()), "ties": int((~nonzero).sum()),
            "losses": int((d < -TIE).sum()), "wilcoxon_p": p, "hurt_share": float(np.mean(hurt))}
