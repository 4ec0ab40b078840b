"""The run folder and W&B: config.yaml, metrics.jsonl, rounds_per_user.jsonl, per_user.csv, results.json, summary table."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import yaml

import fedpeft
from fedpeft.config import Config
from fedpeft.federation.run_folder import store_setting
from fedpeft.federation.selection import ROUNDS_FILE
from fedpeft.federation.verdict import FAILED_RUN_EXIT
from fedpeft.files import atomic_write_text, json_text


def per_user_columns(metric_names: list[str], selected: bool = False, as_is: bool = False,
                     participation: bool = False) -> list[str]:
    """``selected``: the scores are those of a round chosen on validation (``federation.select``
    other than final), which the columns ``selected_round`` and ``val_<headline>`` name. ``group``
    is ``trained`` or ``new`` (``data.new_users``: scored after their fine-tune at the end); with
    ``as_is``, new users' scores before it (the final shared part alone) are ``as_is_<metric>``;
    with ``participation`` (fedpeft.federation.participation), each user's ``availability`` and
    ``rounds_dropped``."""
    chosen = ["selected_round", f"val_{metric_names[0]}"] if selected else []
    before = [f"as_is_{name}" for name in metric_names] if as_is else []
    return ["user_id", "partition_id", "group", "status", *metric_names, *chosen, *before, "n_test", "n_train",
            "rounds_trained", "rounds_scheduled", *(["availability", "rounds_dropped"] if participation else []),
            "examples_processed", "failed_calls", "error"]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def completed_rounds(metrics_path: Path, up_to: int) -> list[str]:
    """The lines of ``metrics.jsonl`` for rounds 1..``up_to`` (a resumed run drops the rest, and
    a line a killed run left half-written)."""
    lines = []
    for line in metrics_path.read_text().splitlines() if metrics_path.is_file() else []:
        try:
            if json.loads(line)["round"] <= up_to:
                lines.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return lines


def cut_after_round(path: Path, up_to: int) -> None:
    """Truncate a JSON-lines file of rounds (lines in round order) before its first line of a
    round after ``up_to``, or its first line that is not whole."""
    offset = 0
    with path.open("rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n") or json.loads(line)["round"] > up_to:
                    break
            except (ValueError, KeyError, TypeError):
                break
            offset += len(line)
    if offset < path.stat().st_size:
        os.truncate(path, offset)


class RunReporter:
    """Writes a run's files and mirrors them to W&B (disabled, offline or online). With
    ``resume_after=r`` it continues a run folder after round r, and the same W&B run."""

    def __init__(self, config: Config, run_dir: Path, wandb_id: str, resume_after: int | None = None) -> None:
        self.config = config
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        meta = {"fedpeft_version": fedpeft.__version__, "git_commit": git_commit()}
        saved = config.to_dict()  # the store relative to the run folder when inside it: a moved folder finds its own
        saved["output"] = {**saved["output"], "store_dir": store_setting(run_dir, config.output.store_dir)}
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump({**meta, **saved}, sort_keys=False))
        self.metrics_path = run_dir / "metrics.jsonl"
        self.rounds_path = run_dir / ROUNDS_FILE
        for path in (self.metrics_path, self.rounds_path):
            kept = completed_rounds(path, resume_after) if resume_after is not None else []
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.wandb_run = self._start_wandb(meta, wandb_id, resume_after is not None)

    def _start_wandb(self, meta: dict[str, str], wandb_id: str, resumed: bool) -> Any:
        wb = self.config.wandb
        if wb.mode == "disabled":
            return None
        import wandb

        return wandb.init(
            mode=wb.mode, project=wb.project, entity=wb.entity or None, group=wb.group or None,
            name=wb.name or self.run_dir.name, tags=wb.tags or None, dir=str(self.run_dir),
            config={**self.config.to_dict(), **meta}, reinit="finish_previous",
            # under a sweep agent the run is the agent's (WANDB_RUN_ID), or the sweep never sees it
            id=os.environ.get("WANDB_RUN_ID") if os.environ.get("WANDB_SWEEP_ID") else wandb_id,
            resume="allow" if resumed else None,
        )

    def log_round(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:  # one whole line per write; a torn last line is dropped on resume
            f.write(json_text(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=int(record["round"]))

    def keep_rounds(self, up_to: int) -> None:
        """Cut ``metrics.jsonl`` and ``rounds_per_user.jsonl`` back to rounds 1..``up_to`` (what the
        checkpoint holds) when a run stops: in place, so that it works on a full disk too."""
        for path in (self.metrics_path, self.rounds_path):
            with contextlib.suppress(OSError):
                cut_after_round(path, up_to)

    def log_user_rounds(self, rows: list[dict[str, Any]]) -> None:
        """Append one evaluated round's per-user validation and test scores (one line per user)."""
        with self.rounds_path.open("a") as f:  # whole lines; a torn last line is dropped on resume
            f.write("".join(json_text(row) + "\n" for row in rows))

    def write_final(self, per_user: list[dict[str, Any]], results: dict[str, Any], predictions: list[dict[str, Any]],
                    metric_names: list[str], failures: list[dict[str, Any]], selected: bool = False,
                    as_is: bool = False, participation: bool = False) -> None:
        """The run's final files; ``failures.json`` is the history of failed calls (round, call,
        user, reason), a user's final status is in ``per_user.csv``."""
        columns = per_user_columns(metric_names, selected, as_is, participation)
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(per_user)
        atomic_write_text(self.run_dir / "per_user.csv", table.getvalue())
        atomic_write_text(self.run_dir / "predictions.jsonl", "".join(json_text(row) + "\n" for row in predictions))
        atomic_write_text(self.run_dir / "failures.json", json_text(failures, indent=2))
        atomic_write_text(self.run_dir / "results.json", json_text(results, indent=2))
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=columns, data=[[row.get(c, "") for c in columns] for row in per_user])
            self.wandb_run.log({"per_user": table})
            for key, value in results["summary"].items():
                self.wandb_run.summary[key] = value
            for key in ("status", "status_reason", "status_counts"):  # a sweep tells a failed run by them
                self.wandb_run.summary[key] = results[key]
            # W&B's run state: failed for a failed verdict (the exit code the process ends with), as a crash is
            self.wandb_run.finish(exit_code=FAILED_RUN_EXIT if results["status"] == "failed" else 0)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def summary_table(results: dict[str, Any]) -> str:
    """A plain-text table of the summary over users, for the console."""
    summary = results["summary"]
    status = results.get("status")  # absent from a results.json written before the run-level verdict
    tag = " (run FAILED)" if status == "failed" else ""  # a failed run's scores are never shown as a result
    rows = [("run status", status_line(results))] if status else []
    rows += [("strategy", results["strategy"]), ("users", results["num_users"]), ("rounds", results["rounds"])]
    selection = results.get("selection", {"rule": "final"})
    rows.append(("round of each user's score", selection.get("description", selection["rule"])))
    for metric in results["metrics"]:
        if results.get("headline") == "corpus":  # LaMP: the benchmark's own score over all questions
            rows.append((f"{metric} (all questions){tag}", summary[metric]))
        for stat in ("mean", "median", "p10", "min"):
            rows.append((f"{metric} {stat} over users{tag}", summary[f"{metric}_{stat}"]))
    headline = results["metrics"][0]
    if f"selected_val_{headline}" in summary:  # the sweep metric: never a test score
        rows.append((f"validation {headline} at that round (selected_val_{headline}){tag}", summary[f"selected_val_{headline}"]))
    groups = results.get("groups", {})
    for group, label in (("new", "new users, fine-tuned"), ("new_as_is", "new users, as is (before the fine-tune)")):
        if group in groups:
            g = groups[group]
            rows += [(f"{label}: {m} mean{tag}", g[f"{m}_mean"]) for m in results["metrics"]]
            rows.append((f"{label}: scored / failed", f"{g['n_evaluated']} of {g['users']} / {g['n_failed']}"))
    who = "trained users" if "new" in groups else "users"  # new users have their own lines above
    privacy = results.get("privacy") or {}
    if privacy.get("mechanism", "none") != "none":
        eps = privacy["epsilon"]
        rows.append(("privacy: epsilon spent (user-level)", f"{'inf' if eps is None else f'{eps:.3f}'} at delta "
                     f"{privacy['delta']:.2g} ({privacy['mechanism']}, noise multiplier {privacy['noise_multiplier']:.3g}, "
                     f"clipping norm {privacy['clipping_norm']:.3g}, {privacy['rounds_composed']} rounds)"))
    rows += [(f"{who} evaluated", summary["n_evaluated"]), (f"{who} failed (no final score)", summary["n_failed"]),
             (f"{who} that trained fewer rounds than scheduled", summary.get("n_undertrained", 0)),
             ("users skipped (unusable data)", summary["n_skipped"]),
             ("bytes communicated", results["communication"]["bytes_total"]),
             ("trainable params / user", results["parameters"]["trainable_params_per_user"]),
             ("examples processed / user", results["compute"]["examples_processed_per_user_mean"]),
             ("wall time (s)", results["wall_seconds"]), ("run folder", results["run_dir"])]
    width = max(len(k) for k, _ in rows)
    lines = ["-" * (width + 30)] + [f"{k:<{width}}  {_fmt(v)}" for k, v in rows] + ["-" * (width + 30)]
    if summary["n_failed"]:
        lines.append(f"{summary['n_failed']} user(s) have no final score: reasons in {results['run_dir']}/per_user.csv "
                     "(error column) and the history of failed calls in failures.json")
    elif results.get("failed_calls"):
        lines.append(f"{results['failed_calls']} call(s) failed during the run, but every user was scored at the end: "
                     f"see {results['run_dir']}/failures.json")
    diverged = results.get("diverged") or {}
    if diverged.get("calls"):
        lines.append(f"{diverged['users']} user(s) diverged in training ({diverged['calls']} call(s) with a non-finite "
                     "loss or weights; each failed, and its user kept the adapter it had before): lower train.lr or check "
                     f"the data (reasons in {results['run_dir']}/failures.json)")
    if privacy.get("stopped_before_round"):
        lines.append(f"training stopped before round {privacy['stopped_before_round']}: it would have taken epsilon past "
                     f"privacy.max_epsilon={privacy['max_epsilon']:g}; the scores are of the last round trained")
    if summary.get("n_undertrained"):
        lines.append(f"{summary['n_undertrained']} user(s) trained fewer rounds than their cohorts gave them (failed calls): "
                     f"compare rounds_trained with rounds_scheduled in {results['run_dir']}/per_user.csv")
    if summary["n_skipped"]:
        lines.append(f"{summary['n_skipped']} user(s) skipped while loading the benchmark: reasons in results.json (skipped_users)")
    if status in ("degraded", "failed"):  # the last line: the verdict and what to try
        lines.append(f"run {status.upper()}: {results['status_reason']}")
    return "\n".join(lines)


def status_line(results: dict[str, Any]) -> str:
    """The summary table's first row: the verdict and its counts (fedpeft.federation.verdict)."""
    c = results["status_counts"]
    if results["status"] == "ok":
        return f"ok (all {c['users']} users trained as scheduled and scored)"
    return (f"{results['status'].upper()}: {c['affected']} of {c['users']} users affected (failed {c['failed']}, "
            f"diverged {c['diverged']}, undertrained {c['undertrained']}; federation.max_failed_fraction="
            f"{c['max_failed_fraction']:g})")
