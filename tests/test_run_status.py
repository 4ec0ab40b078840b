"""A run that did not train is not a result (issue 28, items 2 and 7): results.json's ``status``
(ok, degraded, failed), its reason and counts; a failed run writes everything, exits non-zero with
one line, is marked failed in W&B and never ranks in a sweep; a run with one diverged user of
twenty is degraded and still scores.

The counts are checked against a plain recount of the run's own files (per_user.csv and
failures.json), which shares no code with fedpeft.federation.verdict."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.data.user_groups import new_user_indices
from fedpeft.federation import client_calls
from fedpeft.federation.checkpoint import RunIdentity
from fedpeft.federation.reporting import summary_table
from tests.conftest import tiny_args
from tests.inprocess_grid import run_in_process

REPO = Path(__file__).resolve().parents[1]
FAILED_EXIT = 3  # the exit code the README gives a failed run: distinct from 0, 1 (stopped), 2 (refused), 130/143


def tiny_config(tiny_bert: Path, tmp_path: Path, name: str, users: int = 3, rounds: int = 1) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds = "local_only", rounds
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.val_per_user, cfg.data.test_per_user = users, 8, 2, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 2, 4, 0.05
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), name, False
    return cfg


def recount(run: Path, max_failed_fraction: float) -> dict[str, Any]:
    """The verdict recomputed by hand from per_user.csv and failures.json."""
    with (run / "per_user.csv").open() as f:
        rows = list(csv.DictReader(f))
    failures = json.loads((run / "failures.json").read_text())
    failed = {r["user_id"] for r in rows if r["status"] == "failed"}
    diverged = {f["user_id"] for f in failures if "training diverged" in f["error"]}
    under = {r["user_id"] for r in rows if int(r["rounds_trained"]) < int(r["rounds_scheduled"])}
    affected = failed | diverged | under
    status = "ok" if not affected else "failed" if len(affected) > max_failed_fraction * len(rows) else "degraded"
    return {"status": status, "status_counts": {"users": len(rows), "failed": len(failed), "diverged": len(diverged),
                                                "undertrained": len(under), "affected": len(affected),
                                                "max_failed_fraction": max_failed_fraction}}


def diverge_for(monkeypatch: pytest.MonkeyPatch, cfg: Config, users: set[int]) -> None:
    """The real train_user, at lr=1e30 for ``users``' calls (recognised by their training texts)."""
    bench = get_benchmark(cfg)
    texts = {tuple(ex.text for ex in bench.load_user(u).train) for u in users}
    real = client_calls.train_user

    def train_user(loaded, examples, task, config, seed, **kw):
        if tuple(ex.text for ex in examples) in texts:
            kw["lr"] = 1e30
        return real(loaded, examples, task, config, seed, **kw)

    monkeypatch.setattr(client_calls, "train_user", train_user)


def test_every_call_diverging_is_a_failed_run_with_honest_counts(tiny_bert, tmp_path):
    """Before: no status; n_failed 0 (a diverged user keeps its adapter and is scored), headline shown as a result."""
    cfg = tiny_config(tiny_bert, tmp_path, "lr1e30", rounds=2)
    cfg.train.lr = 1e30
    results, run = run_in_process(cfg)
    on_disk = json.loads((run / "results.json").read_text())
    expected = recount(run, 0.1)
    assert expected == {"status": "failed", "status_counts": {"users": 3, "failed": 0, "diverged": 3, "undertrained": 3,
                                                              "affected": 3, "max_failed_fraction": 0.1}}
    for r in (results, on_disk):
        assert {k: r[k] for k in ("status", "status_counts")} == expected
        assert "3 of 3 users (100%)" in r["status_reason"] and "3 diverged in training" in r["status_reason"]
        assert "lower train.lr (this run used 1e+30)" in r["status_reason"] and "\n" not in r["status_reason"]
    assert results["summary"]["n_failed"] == 0  # no user is without a final score: the verdict is what says it
    text = summary_table(results)
    assert text.splitlines()[1].startswith("run status") and "FAILED: 3 of 3 users affected" in text.splitlines()[1]
    scores = [line for line in text.splitlines() if line.startswith(("accuracy", "validation accuracy"))]
    assert scores and all("(run FAILED)" in line for line in scores), scores  # never a bare number beside a score
    assert text.splitlines()[-1].startswith("run FAILED: 3 of 3 users")


@pytest.mark.parametrize(("key", "value", "error"), [("seed", -1, "negative"),
                                                     ("weight_decay", -5.0, "Invalid weight_decay value: -5.0")])
def test_a_run_whose_every_training_call_fails_is_failed(key, value, error, tiny_bert, tmp_path):
    """Issue 28 item 7: ``--seed -1`` and ``train.weight_decay=-5`` (set here past the config
    checks) failed every training call, and the run printed the untrained model's score with
    "users failed 0". Before: no status."""
    cfg = tiny_config(tiny_bert, tmp_path, key)
    setattr(cfg if key == "seed" else cfg.train, key, value)
    results, run = run_in_process(cfg)
    failures = json.loads((run / "failures.json").read_text())
    assert [f["call"] for f in failures].count("train") == 3 and all(error in f["error"] for f in failures)
    expected = recount(run, 0.1)
    assert expected["status"] == "failed" and expected["status_counts"]["undertrained"] == 3
    assert {k: results[k] for k in ("status", "status_counts")} == expected
    assert error in results["status_reason"] and "failures.json" in results["status_reason"]


def test_one_diverged_user_of_twenty_is_degraded_and_still_scores(tiny_bert, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_bert, tmp_path, "one-of-20", users=20)
    diverge_for(monkeypatch, cfg, {7})
    results, run = run_in_process(cfg)
    expected = recount(run, 0.1)
    assert expected["status_counts"] == {"users": 20, "failed": 0, "diverged": 1, "undertrained": 1, "affected": 1,
                                         "max_failed_fraction": 0.1}
    assert {k: results[k] for k in ("status", "status_counts")} == {**expected, "status": "degraded"}
    assert "1 of 20 users (5%)" in results["status_reason"] and "still scores" in results["status_reason"]
    with (run / "per_user.csv").open() as f:
        accuracy = [float(r["accuracy"]) for r in csv.DictReader(f)]
    assert len(accuracy) == 20 and results["summary"]["n_evaluated"] == 20
    assert math.isclose(results["summary"]["accuracy"], sum(accuracy) / 20, abs_tol=1e-12)  # the headline stands
    text = summary_table(results)
    assert "DEGRADED: 1 of 20 users affected" in text and "(run FAILED)" not in text
    assert text.splitlines()[-1].startswith("run DEGRADED: 1 of 20 users")


def test_a_new_user_whose_fine_tune_fails_counts(tiny_bert, tmp_path, monkeypatch):
    """A new user (data.new_users) whose final fine-tune diverges has no score: one failed user
    of all the run's users (trained and new). 1 of 10 is within 0.1; with 0.05 the run fails."""
    cfg = tiny_config(tiny_bert, tmp_path, "new-user", users=10)
    cfg.data.new_users = "count:1"
    new = new_user_indices(cfg, 10)
    assert len(new) == 1
    diverge_for(monkeypatch, cfg, set(new))
    results, run = run_in_process(cfg)
    expected = recount(run, 0.1)
    assert expected["status_counts"] == {"users": 10, "failed": 1, "diverged": 1, "undertrained": 0, "affected": 1,
                                         "max_failed_fraction": 0.1}
    assert {k: results[k] for k in ("status", "status_counts")} == {**expected, "status": "degraded"}
    assert results["groups"]["new"]["n_failed"] == 1 and results["summary"]["n_failed"] == 0

    strict = tiny_config(tiny_bert, tmp_path, "new-user-strict", users=10)
    strict.data.new_users, strict.federation.max_failed_fraction = "count:1", 0.05
    results, run = run_in_process(strict)
    assert {k: results[k] for k in ("status", "status_counts")} == recount(run, 0.05)
    assert results["status"] == "failed"


def test_a_failed_run_is_failed_in_wandb_and_never_ranks_in_a_sweep(tiny_bert, tmp_path, monkeypatch):
    """Before: W&B's run ended with exit code 0 and no status in its summary; the offline sweep
    gave a failed run's score to the engine as a finished run's."""
    from tests.test_sweep_metric import finished_records, wandb_summary

    monkeypatch.setenv("WANDB_MODE", "offline")
    for name, lr in (("failed", 1e30), ("ok", 0.05)):
        cfg = tiny_config(tiny_bert, tmp_path, name)
        cfg.train.lr, cfg.wandb.mode = lr, "offline"
        results, run = run_in_process(cfg)
        exits = [r.exit.exit_code for r in finished_records(run) if r.WhichOneof("record_type") == "exit"]
        summary = wandb_summary(run)
        wandb_id = RunIdentity.read(run).wandb_id
        if name == "failed":
            assert exits == [FAILED_EXIT], exits
            assert summary["status"] == "failed" and summary["status_counts"]["diverged"] == 3
            assert summary["status_reason"] == results["status_reason"]
            # the offline sweep: even a process that exited 0 is failed by its results.json, and the metric goes
            from fedpeft.sweep import logged_metrics, sweep_state, without_metric

            assert sweep_state(tmp_path, wandb_id, 0) == "failed"
            metric_summary, history = without_metric("accuracy", *logged_metrics(tmp_path, wandb_id))
            assert "accuracy" not in metric_summary and all("accuracy" not in h for h in history)
        else:
            from fedpeft.sweep import sweep_state

            assert exits == [0] and summary["status"] == "ok" and results["status"] == "ok"
            assert sweep_state(tmp_path, wandb_id, 0) == "finished" and sweep_state(tmp_path, wandb_id, 1) == "failed"


@pytest.mark.slow
def test_the_entry_point_exits_non_zero_with_one_line_after_writing_everything(tiny_bert, tmp_path):
    """``python -m fedpeft.sim ... train.lr=1e30`` on Ray. Before: exit 0, "users failed 0"."""
    args = tiny_args(tiny_bert, tmp_path, "diverges", "--strategy", "local_only", "train.lr=1e30")
    done = subprocess.run([sys.executable, "-m", "fedpeft.sim", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == FAILED_EXIT, (done.returncode, done.stderr[-3000:])
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    (line,) = lines
    assert line.startswith("fedpeft: error: the run failed: 6 of 6 users (100%)"), line
    assert "lower train.lr (this run used 1e+30)" in line and str(tmp_path / "diverges") in line
    run = tmp_path / "diverges"
    for name in ("results.json", "per_user.csv", "failures.json", "predictions.jsonl", "metrics.jsonl", "config.yaml"):
        assert (run / name).is_file(), name
    results = json.loads((run / "results.json").read_text())
    assert {k: results[k] for k in ("status", "status_counts")} == recount(run, 0.1)
    assert results["status"] == "failed" and results["status_counts"]["diverged"] == 6
    assert "run status" in done.stdout and "(run FAILED)" in done.stdout
