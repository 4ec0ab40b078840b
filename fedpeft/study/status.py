"""Run statuses in a comparison: which runs trained, and what a strategy with a failed run shows.

Each run's results.json says ``status``: ``ok``, ``degraded`` (some users failed, diverged or
trained fewer rounds than scheduled) or ``failed`` (more than ``federation.max_failed_fraction``
of them), with ``status_reason`` and ``status_counts``. A results.json without ``status`` (a run
from before statuses) reads as ``unknown`` and counts as ok, unless it scored nobody (failed).
A run that raised (``python -m fedpeft.sim`` exits non-zero; in process, :func:`fedpeft.sim.run`
raises) is recorded as failed, read from what its folder holds, and the comparison goes on. A
strategy with a failed run in any seed has no headline number and is kept out of the common users
(:func:`fedpeft.study.runs.user_set`); a degraded one keeps its numbers and is flagged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.study.runs import SeedRun, UserSet, _one_line, left_out_text

OK, DEGRADED, FAILED, UNKNOWN = "ok", "degraded", "failed", "unknown"
STATUSES = (OK, DEGRADED, FAILED)
BASELINE_STATUS = "baseline"  # the majority row: computed from the data, not a run


def run_status(results: dict[str, Any]) -> tuple[str, str]:
    """(status, reason) of one run's results.json."""
    status = results.get("status")
    if status in STATUSES:
        return status, str(results.get("status_reason") or "")
    if status is not None:
        return FAILED, f"results.json has status {status!r}; allowed: {', '.join(STATUSES)}"
    if (results.get("summary") or {}).get("n_evaluated") == 0:
        return FAILED, "every user failed (results.json has no status: a run from before run statuses)"
    return UNKNOWN, "results.json has no status (a run from before run statuses): read as ok"


class RunNotFinished(Exception):
    """A run a report reads that is missing or unfinished (``--report-only``): the message says
    which; it is shown as a failed run with that reason, and nothing is run."""


def run_one(runner: Callable[[Config], dict[str, Any]], cfg: Config, run_dir: Path, seed: int,
            rules: tuple[str, ...]) -> SeedRun:
    """``runner(cfg)`` read back as one seed's run. A run that raises (a config error aside, which
    every run would repeat) is a failed run: what its folder holds if it wrote its results, else a
    run without users; either way the comparison goes on."""
    try:
        results = runner(cfg)
    except ConfigError:
        raise
    except RunNotFinished as err:
        print(f"fedpeft: run {run_dir.name} is {err}; the report shows it as not run", flush=True)
        return failed_run(seed, run_dir, rules, f"not run ({err})", task_metrics(cfg))
    except Exception as err:  # noqa: BLE001 - one run's failure, recorded; the comparison goes on
        why = _one_line(f"{type(err).__name__}: {err}", 300)
        print(f"fedpeft: run {run_dir.name} failed ({why}); the comparison goes on without it", flush=True)
        return failed_run(seed, run_dir, rules, why, task_metrics(cfg))
    return SeedRun.read(seed, run_dir, as_written(run_dir, results), rules)


def as_written(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The run's results.json as read back (what a resumed study reads for a run it keeps, so that
    a comparison's numbers do not depend on whether its runs ran just now); ``results`` when the
    folder has none."""
    from fedpeft.files import json_value

    try:
        return json_value((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return results


def task_metrics(cfg: Config) -> list[str]:
    """The task's metrics, for a run that wrote none (empty when the data do not load either)."""
    from fedpeft.data import get_benchmark

    try:
        return list(get_benchmark(cfg).task().metrics)
    except Exception:  # noqa: BLE001 - the run failed already; its reason is recorded
        return []


def failed_run(seed: int, run_dir: Path, rules: tuple[str, ...], why: str, metrics: list[str]) -> SeedRun:
    """A run that raised: its folder's results (status failed) where it wrote them, else none."""
    from fedpeft.files import json_value

    try:
        results = json_value((run_dir / "results.json").read_text())
        run = SeedRun.read(seed, run_dir, results, rules)
    except (OSError, ValueError, KeyError):
        run = SeedRun(seed, {"run_dir": str(run_dir), "metrics": metrics}, {rule: {} for rule in rules})
    if run.status != FAILED:
        run.status, run.status_reason = FAILED, why
    return run


@dataclass(frozen=True)
class StrategyStatus:
    """A strategy's runs together: ``failed`` if any seed failed, else ``degraded`` if any was, else
    ok (``unknown`` when no run said); ``count``: seeds with that status, of ``seeds``."""

    status: str
    count: int
    seeds: int
    reason: str

    @property
    def has_headline(self) -> bool:
        return self.status != FAILED

    def cell(self) -> str:
        """'ok', 'unknown', 'failed (1/3 seeds)', 'degraded (2/3 seeds)'."""
        if self.status in (FAILED, DEGRADED):
            return f"{self.status} ({self.count}/{self.seeds} seed{'s' if self.seeds > 1 else ''})"
        return self.status


def strategy_status(seeds: list[SeedRun]) -> StrategyStatus:
    for status in (FAILED, DEGRADED, UNKNOWN):
        hit = [run for run in seeds if run.status == status]
        if hit:
            reason = "; ".join(dict.fromkeys(f"seed {r.seed}: {r.status_reason}" if r.status_reason else f"seed {r.seed}"
                                             for r in hit))
            return StrategyStatus(status, len(hit), len(seeds), reason if status != UNKNOWN else hit[0].status_reason)
    return StrategyStatus(OK, len(seeds), len(seeds), "")


def run_rows(runs: dict[str, list[SeedRun]]) -> list[dict[str, Any]]:
    """runs.csv: every run of the comparison, its folder, status, reason and counts."""
    rows = []
    for name, seeds in runs.items():
        for run in seeds:
            counts = run.status_counts
            rows.append({"strategy": name, "seed": run.seed, "folder": Path(str(run.results.get("run_dir", ""))).name,
                         "status": run.status, "status_reason": run.status_reason,
                         **{f"users_{k}" if k != "users" else "users": counts.get(k, math.nan)
                            for k in ("users", "failed", "diverged", "undertrained", "affected")}})
    return rows


def runs_section(rows: list[dict[str, Any]]) -> list[str]:
    """comparison.md's list of the runs that are not plainly ok (none: one line saying so)."""
    bad = [r for r in rows if r["status"] not in (OK,)]
    if not bad:
        return [f"Every run ({len(rows)}) reports status ok (runs.csv)."]
    lines = [f"Runs not plainly ok ({len(bad)} of {len(rows)}; every run's status is in runs.csv):", ""]
    for r in bad:
        lines.append(f"- {r['folder'] or r['strategy']} (seed {r['seed']}): **{r['status']}**"
                     + (f": {r['status_reason']}" if r["status_reason"] else ""))
    return lines


def status_columns(name: str, seeds: list[SeedRun], users: UserSet, prefix: str = "") -> dict[str, Any]:
    """Who a strategy's runs lost (users of the group they did not score in every seed: each is out
    of every strategy's common set) and, trained users only, its runs' status."""
    out: dict[str, Any] = {}
    if not prefix:
        status = strategy_status(seeds)
        out = {"status": status.status, "status_seeds": f"{status.count}/{status.seeds}", "status_reason": status.reason}
    return {**out, f"{prefix}users_lost": len(users.left_out[name]), f"{prefix}lost_why": left_out_text(users.left_out[name])}


def privacy_columns(seeds: list[SeedRun]) -> dict[str, Any]:
    """δ and n (the population the accountant counted) of the runs' results.json ``privacy``: the
    value when every run that has one agrees, the values joined by '/' when not, NaN without DP."""
    out: dict[str, Any] = {}
    for key in ("delta", "population_size"):
        values = list(dict.fromkeys(v for r in seeds if (v := (r.results.get("privacy") or {}).get(key)) is not None))
        out[key] = values[0] if len(values) == 1 else "/".join(map(str, values)) if values else math.nan
    return out
