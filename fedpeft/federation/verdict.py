"""A run's verdict (results.json ``status``): ``ok``, ``degraded`` or ``failed``.

A user is *affected* when it has no final score (``failed``: its last call failed, or, a new
user of ``data.new_users``, its fine-tune or its scoring failed), when any of its calls diverged
(``diverged``), or when it trained fewer rounds than its cohorts gave it (``undertrained``).
A diverged user keeps the adapter of its last good round and is still scored, which is why the
summary's ``n_failed`` (users with no final score) alone cannot tell a run that never trained.
The run is ``failed`` when more than ``federation.max_failed_fraction`` of all its users (trained
and new) are affected, ``degraded`` when any is, ``ok`` otherwise. A failed run writes every
file, then ``python -m fedpeft.sim`` exits with :data:`FAILED_RUN_EXIT` and one line on stderr.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fedpeft.learning.training import is_divergence

FAILED_RUN_EXIT = 3  # 1: the run stopped (RunFailed, a full disk); 2: refused config; 130/143: signals
REASON_CHARS = 160  # a failure reason quoted in the one line is cut to this


def affected_users(per_user: list[dict[str, Any]], failures: list[dict[str, Any]]) -> dict[str, set[int]]:
    """The partition ids of the users that failed, diverged and undertrained (see the module)."""
    return {
        "failed": {row["partition_id"] for row in per_user if row["status"] != "ok"},
        "diverged": {f["partition_id"] for f in failures if is_divergence(f["error"])},
        "undertrained": {row["partition_id"] for row in per_user if row["rounds_trained"] < row["rounds_scheduled"]},
    }


def most_frequent_reason(failures: list[dict[str, Any]]) -> str:
    """The failed calls' most frequent reason (its last line, cut to :data:`REASON_CHARS`)."""
    reasons = Counter(" ".join(str(f["error"]).split()) for f in failures if f["error"])
    if not reasons:
        return ""
    reason = reasons.most_common(1)[0][0]
    return reason if len(reason) <= REASON_CHARS else reason[:REASON_CHARS - 3] + "..."


def advice(counts: dict[str, Any], failures: list[dict[str, Any]], lr: float) -> str:
    """What to try, for the reason sentence."""
    if counts["diverged"]:
        return f"try a lower train.lr (this run used {lr:g}) and see failures.json for each failed call"
    reason = most_frequent_reason(failures)
    quoted = f"the most frequent reason is '{reason}': fix that, and " if reason else ""
    return f"{quoted}see failures.json for each failed call and per_user.csv's error column"


def run_verdict(per_user: list[dict[str, Any]], failures: list[dict[str, Any]], max_failed_fraction: float,
                lr: float) -> dict[str, Any]:
    """results.json's ``status``, ``status_reason`` and ``status_counts`` for a run's per-user rows
    (``status``, ``rounds_trained``, ``rounds_scheduled``, ``partition_id``) and failed calls."""
    sets = affected_users(per_user, failures)
    users, affected = len(per_user), len(set().union(*sets.values()))
    counts = {"users": users, **{k: len(v) for k, v in sets.items()}, "affected": affected,
              "max_failed_fraction": max_failed_fraction}
    if not affected:
        return {"status": "ok", "status_counts": counts,
                "status_reason": f"all {users} users trained every round scheduled and were scored."}
    status = "failed" if affected / users > max_failed_fraction else "degraded"  # division: 57/100 > 0.57 is False
    what = ", ".join(f"{n} {label}" for n, label in ((counts["failed"], "failed (no final score)"),
                                                     (counts["diverged"], "diverged in training"),
                                                     (counts["undertrained"], "trained fewer rounds than scheduled")) if n)
    limit = f"federation.max_failed_fraction={max_failed_fraction:g}"
    judged = (f"more than {limit}, so its scores are not a result" if status == "failed"
              else f"within {limit}, so the run still scores")
    reason = (f"{affected} of {users} users ({affected / users:.0%}) were affected ({what}), {judged}; "
              f"{advice(counts, failures, lr)}.")
    return {"status": status, "status_reason": reason, "status_counts": counts}


def failed_run_line(results: dict[str, Any]) -> str:
    """The one line on stderr of a run whose status is failed."""
    return f"fedpeft: error: the run failed: {results['status_reason']} Its files are in {results['run_dir']}."
