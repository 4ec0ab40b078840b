"""The run's results: every user's row, the summary, and results.json with everything beside it.

:func:`finish_run` runs once, after the rounds and the new users: it saves the final shared part,
keeps each user's final adapter only, builds ``per_user.csv``'s rows (:func:`per_user_rows`), the
summary of the scores ``federation.select`` reports (per group: trained, new, new_as_is; and by
activity), the run's verdict (fedpeft.federation.verdict), its communication, privacy, compute
and timings, and hands it all to the :class:`~fedpeft.federation.reporting.RunReporter`.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Message
from safetensors.torch import save_file

from fedpeft.config import Config
from fedpeft.data import data_summary, get_benchmark
from fedpeft.data.activity import activity_bins, bin_means, by_activity
from fedpeft.federation.budget import PrivacyBudget
from fedpeft.federation.evaluation import Scoring
from fedpeft.federation.new_users import new_user_groups
from fedpeft.federation.participation import Participation
from fedpeft.federation.progress import RunProgress, partition_id
from fedpeft.federation.reporting import RunReporter
from fedpeft.federation.store import AdapterStore
from fedpeft.federation.verdict import run_verdict
from fedpeft.files import atomic_write
from fedpeft.learning.training import divergence_counts


def per_user_rows(progress: RunProgress, metric_names: list[str], scores: dict[int, Message],
                  as_is: dict[int, Message], participation: Participation | None = None,
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every user's row (its group, training, failures, and its scores or why it has none) and the
    scored users' predictions. ``scores``: each scored user's last evaluate reply; ``as_is``: the
    new users' replies before their fine-tune; with an active ``participation``, each user's
    availability (its probability of being online in a round) and rounds dropped."""
    held_out = set(progress.new_users)
    failures = progress.failures
    last_failure = {f["partition_id"]: f for f in failures}  # the latest failure of each user
    per_user, predictions = [], []
    for index, user_id in enumerate(progress.user_ids):
        row: dict[str, Any] = {"user_id": user_id, "partition_id": index, "group": "new" if index in held_out else "trained",
                               "rounds_trained": int(progress.rounds_trained[index]),
                               "rounds_scheduled": int(progress.rounds_scheduled[index]),
                               "examples_processed": int(progress.examples_processed[index]),
                               "failed_calls": sum(f["partition_id"] == index for f in failures)}
        if participation is not None and participation.active:
            row.update(availability=float(participation.probability[index]), rounds_dropped=int(progress.rounds_dropped[index]))
        if index not in scores:  # a user scored at the end counts as scored, whatever failed before
            failure = last_failure.get(index, {"error": "no evaluation reply", "traceback": ""})
            row.update(status="failed", error=failure["error"], traceback=failure["traceback"])
        else:
            m, info = scores[index].content.metric_records["metrics"], scores[index].content.config_records["info"]
            row.update(status="ok", n_test=int(m["n_test"]), n_train=int(m["n_train"]), error="",
                       **{name: m[name] for name in metric_names})
            if index in as_is:
                row.update({f"as_is_{name}": as_is[index].content.metric_records["metrics"][name] for name in metric_names})
            predictions.append({"user_id": user_id, "group": row["group"], "sample_ids": list(info["sample_ids"]),
                                "predictions": list(info["predictions"])})
        per_user.append(row)
    return per_user, predictions


def finish_run(*, config: Config, run_dir: Path, run_id: str, progress: RunProgress, scoring: Scoring,
               budget: PrivacyBudget, accounting: dict[str, Any], reporter: RunReporter,
               shared: dict[str, torch.Tensor], total_rounds: int, timings: dict[str, Any],
               final: list[Message], new: dict[str, list[Message]], wall: float,
               participation: Participation | None = None) -> dict[str, Any]:
    """The run's results: ``final``, the trained users' last evaluation; ``new``, the new users'
    scores after their fine-tune (and, fedavg, before it: "as_is"); ``wall``, the run's wall time."""
    totals = progress.totals
    metric_names = scoring.metric_names
    if shared:
        tensors = {k: v.contiguous() for k, v in shared.items()}
        atomic_write(run_dir / "shared_final.safetensors", lambda tmp: save_file(tensors, tmp))
    scores = {partition_id(r): r for r in final + new["new"]}
    as_is = {partition_id(r): r for r in new["as_is"]}
    per_user, predictions = per_user_rows(progress, metric_names, scores, as_is, participation)
    active = participation is not None and participation.active
    store = AdapterStore(config.output.store_dir, run_id)
    store.keep_only(dict(zip(progress.user_ids, progress.last_round.tolist())))  # each user's final adapter only
    stored = [store.bytes_stored(u, int(r)) for u, r in zip(progress.user_ids, progress.last_round)]
    ok = [row for row in per_user if row["status"] == "ok" and row["group"] == "trained"]
    n_failed = len(progress.trained_users) - len(ok)
    skipped = get_benchmark(config).skipped_users()
    rule = config.federation.select
    chosen, selection_info = scoring.selected(per_user, ok, scores, rule, total_rounds)
    # trained users whose cohorts gave them rounds they did not train (failed calls): scored, but on less training
    undertrained = int(sum(progress.rounds_trained[i] < progress.rounds_scheduled[i] for i in progress.trained_users))
    # the run's verdict over every user, trained and new (fedpeft.federation.verdict): a diverged user is scored, not failed
    verdict = run_verdict(per_user, progress.failures, config.federation.max_failed_fraction, config.train.lr)
    summary: dict[str, Any] = {"n_evaluated": len(ok), "n_failed": n_failed, "n_skipped": len(skipped),
                               "n_undertrained": undertrained, **chosen}
    # the sweep metric: the validation score the rule chose by (never a test score)
    summary.update(scoring.selected_validation(rule, total_rounds))
    if budget.accountant is not None:  # the run's epsilon beside its scores (W&B summary: sweeps over privacy)
        summary["epsilon"] = budget.report(accounting)["epsilon"]
    groups = {"trained": {"users": len(progress.trained_users), **summary}}
    if progress.new_users:
        groups.update(new_user_groups(per_user, scores, as_is, len(progress.new_users), scoring))
        summary.update({f"{group}_{key}": value for group in ("new", "new_as_is") for key, value in groups.get(group, {}).items()
                        if key in metric_names or key in ("n_evaluated", "n_failed")})
    results = {
        **verdict,  # status (ok, degraded, failed), status_reason, status_counts
        "metrics": metric_names,
        "headline": "corpus" if scoring.task.corpus_metrics else "mean over users",
        "strategy": config.federation.strategy, "benchmark": config.data.benchmark,
        "model": config.model.name, "num_users": len(progress.user_ids), "rounds": total_rounds,
        "summary": summary, "groups": groups, "by_activity": activity(per_user, metric_names), "selection": selection_info,
        "wall_seconds": wall, "run_dir": str(run_dir),
        # bytes_total: the training traffic (down and up); evaluation messages carry the shared part down too
        "communication": {**totals, "bytes_total": totals["bytes_down"] + totals["bytes_up"],
                          "bytes_total_with_eval": totals["bytes_down"] + totals["bytes_up"] + totals["bytes_down_eval"]},
        "parameters": {k: v for k, v in accounting.items() if k != "pretrain_examples"},
        "private_bytes_per_user": {"mean": float(np.mean(stored)) if stored else 0.0, "max": int(max(stored, default=0))},
        "failed_users": {row["user_id"]: row["error"] for row in per_user if row["status"] != "ok"},
        "failed_calls": len(progress.failures),
        "privacy": budget.report(accounting),
        "diverged": divergence_counts(progress.failures),  # failed calls whose loss or weights became non-finite
        "compute": {"examples_processed_per_user_mean": float(progress.examples_processed.mean()) if len(progress.user_ids) else 0.0,
                    "examples_processed_total": int(progress.examples_processed.sum()),
                    "driver_pretrain_examples": int(accounting.get("pretrain_examples", 0)),
                    # train.pack_users > 1: the worker count its calls were cut into bundles for (the run's first start's)
                    "bundle_workers": progress.bundle_workers if config.train.pack_users > 1 else 0},
        "skipped_users": skipped,
        "data": data_summary(get_benchmark(config)),  # labels, users and examples per split
        "workers": {str(pid): loads for pid, loads in sorted(progress.worker_loads.items())},
        # this process's own: wall times of its phases and the driver's peak resident memory
        "timings": {**timings, "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
    }
    if active:  # who was online and dropped, and the trained users binned by the rounds they trained
        results["participation"] = participation.report(progress.trained_users, progress.dropped, progress.sim_time)
        results["by_participation"] = by_participation(per_user, metric_names)
    reporter.write_final(per_user, results, predictions, metric_names, progress.failures, selected=rule != "final",
                         as_is=bool(as_is), participation=active)
    return results


def activity(per_user: list[dict[str, Any]], metric_names: list[str]) -> dict[str, Any]:
    """Per group, the scored users binned by their number of training examples
    (:func:`fedpeft.data.activity.by_activity`), every metric's mean per bin."""
    out: dict[str, Any] = {}
    for group in ("trained", "new"):
        rows = [row for row in per_user if row["group"] == group and row["status"] == "ok"]
        if rows:
            out[group] = by_activity({row["user_id"]: row for row in rows}, {row["user_id"]: row["n_train"] for row in rows},
                                     metric_names)
    return out


def by_participation(per_user: list[dict[str, Any]], metric_names: list[str]) -> list[dict[str, Any]]:
    """The scored trained users binned by the rounds they trained (terciles, as
    :func:`fedpeft.data.activity.activity_bins` cuts them), every metric's mean per bin."""
    rows = {row["user_id"]: row for row in per_user if row["group"] == "trained" and row["status"] == "ok"}
    rounds = {user: int(row["rounds_trained"]) for user, row in rows.items()}
    names = {"min_examples": "min_rounds_trained", "max_examples": "max_rounds_trained", "mean_examples": "mean_rounds_trained"}
    return [{names.get(k, k): v for k, v in b.items()} for b in bin_means(activity_bins(rounds), rows, metric_names, rounds)]
