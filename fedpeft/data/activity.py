"""Users binned by activity, the number of training examples each one has (OPPU's "users at
different active levels"): who gains from sharing, the users with little data or those with a lot?

:func:`activity_bins` cuts users into ranges of ``n_train``; :func:`by_activity` gives each
bin's mean scores. Pure: no fedpeft imports, no files.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

TERCILE_NAMES = ("low", "mid", "high")


@dataclass(frozen=True)
class ActivityBin:
    """Users whose ``n_train`` lies in ``low..high`` (inclusive)."""

    name: str
    low: int
    high: int
    users: list[str] = field(default_factory=list)


def activity_bins(n_train: Mapping[str, int], bins: int = 3) -> list[ActivityBin]:
    """Users sorted by ``n_train`` and cut after k·n/bins users (k = 1..bins-1), each cut moved to
    the nearest place where ``n_train`` changes (the lower one when two are as near), so that users
    with the same ``n_train`` always share a bin; cuts that land on the same place merge, so fewer
    distinct values than ``bins`` give fewer bins (at most one per distinct value).

    Names: ``low``, ``mid``, ``high`` when there are 3 bins, else ``bin1`` .. ``binN``; bins are in
    increasing order of ``n_train``, users in each sorted by (``n_train``, user)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"activity_bins: bins={bins!r}; give a whole number >= 1 (3 = terciles).")
    order = sorted(n_train, key=lambda u: (n_train[u], u))
    values = [int(n_train[u]) for u in order]
    n = len(order)
    if n == 0:
        return []
    changes = [c for c in range(1, n) if values[c - 1] != values[c]]  # cut after c users
    cuts = sorted({min(changes, key=lambda c: (abs(c - k * n / bins), c)) for k in range(1, bins)} if changes else set())
    edges = [0, *cuts, n]
    parts = [order[a:b] for a, b in zip(edges, edges[1:])]
    names = TERCILE_NAMES if len(parts) == 3 else [f"bin{i}" for i in range(1, len(parts) + 1)]
    return [ActivityBin(name, int(n_train[part[0]]), int(n_train[part[-1]]), list(part)) for name, part in zip(names, parts)]


def bin_means(groups: Sequence[ActivityBin], scores: Mapping[str, Mapping[str, float]], metrics: Sequence[str],
              n_train: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """Per bin: its name, its number of users, its range of training examples (and, given
    ``n_train``, their mean, ``mean_examples``), and per metric the mean over its users that have
    a finite score for it (NaN if none). Means are exact sums (``math.fsum``)."""
    out = []
    for group in groups:
        row: dict[str, Any] = {"bin": group.name, "users": len(group.users), "min_examples": group.low,
                               "max_examples": group.high}
        if n_train is not None:
            row["mean_examples"] = math.fsum(n_train[u] for u in group.users) / len(group.users) if group.users else math.nan
        for metric in metrics:
            values = [float(scores[u][metric]) for u in group.users
                      if u in scores and metric in scores[u] and math.isfinite(float(scores[u][metric]))]
            row[metric] = math.fsum(values) / len(values) if values else math.nan
        out.append(row)
    return out


def by_activity(scores: Mapping[str, Mapping[str, float]], n_train: Mapping[str, int],
                metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One dict per activity bin (terciles of :func:`activity_bins`, computed over the users of
    ``scores`` that have an ``n_train``): ``bin``, ``users`` (count), ``min_examples``,
    ``max_examples``, ``mean_examples`` and per metric the mean over the bin's users."""
    users = {u: int(n_train[u]) for u in scores if u in n_train}
    return bin_means(activity_bins(users), scores, metrics, users)
