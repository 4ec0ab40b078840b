"""``python -m fedpeft.sweep SWEEP.yaml --count N``: a W&B-format sweep on a machine with no
internet (HPC compute nodes), W&B's own sweep engine proposing the parameters.

Each run is started exactly as ``wandb agent`` starts it (:func:`agent_command`, which follows
``wandb.wandb_agent.Agent._command_run`` with wandb's own command helpers): the sweep's
``command`` with its macros (``${args}``, ``${args_json_file}``, ...), ``WANDB_SWEEP_ID``,
``WANDB_RUN_ID`` and ``WANDB_SWEEP_PARAM_PATH`` set, and W&B offline (``wandb sync`` later).
The metric in ``metric.name`` is read back from the run's summary, built as W&B builds the run's
summary (:func:`logged_metrics`), and given to the engine: an offline sweep and a ``wandb agent``
see the same number. A run whose process exits non-zero or whose results.json says ``status:
failed`` (fedpeft.federation.verdict) is given to the engine as failed and without the metric, as W&B marks
it (``run.finish(exit_code=...)``): its score is never a point of the sweep. Tune on
``selected_val_<metric>`` (e.g. ``selected_val_accuracy``), the validation score at the rounds
``federation.select`` picks; ``accuracy`` and ``accuracy_mean`` are test scores.

The engine is the ``sweeps`` package (``next_run``); it pins numpy < 2, so it runs in an
interpreter of its own: ``--engine-python PATH`` (a venv with ``pip install sweeps``), or this
one when it can import ``sweeps``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import yaml

from fedpeft.federation.selection import SELECTED_VAL
from fedpeft.files import json_value

ENGINE = """
import json, sys
from sweeps import RunState, SweepRun, next_run
data = json.load(sys.stdin)
runs = [SweepRun(name=r["name"], state=RunState(r["state"]), config=r["config"],
                 summary_metrics=r["summary"], history=r["history"]) for r in data["runs"]]
run = next_run(data["sweep"], runs)
print(json.dumps(None if run is None else run.config))
"""


def propose(engine_python: str, sweep: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The engine's next parameters ({name: {"value": v}}), or None when the sweep is done."""
    done = subprocess.run([engine_python, "-c", ENGINE], input=json.dumps({"sweep": sweep, "runs": runs}),
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"fedpeft.sweep: the sweep engine failed ({engine_python}): {done.stderr[-2000:]}\n"
                         "Give --engine-python a Python with W&B's engine: python -m venv ENV && ENV/bin/pip install sweeps")
    return json.loads(done.stdout.strip().splitlines()[-1])


def agent_command(sweep: dict[str, Any], args: dict[str, Any], run_id: str, sweep_id: str,
                  base_dir: str = "") -> tuple[list[str], dict[str, str]]:
    """The command and environment ``wandb agent`` would run for parameters ``args``."""
    import wandb
    from wandb.sdk.launch.sweeps import utils as sweep_utils
    from wandb.sdk.lib import config_util

    sweep_command = sweep_utils.create_sweep_command(list(sweep["command"]) if sweep.get("command") else None)
    config_file = os.path.join("wandb", f"sweep-{sweep_id}", f"config-{run_id}.yaml")
    json_file = os.path.join("wandb", f"sweep-{sweep_id}", f"config-{run_id}.json")
    env = {**os.environ, wandb.env.SWEEP_ID: sweep_id, wandb.env.RUN_ID: run_id}
    sweep_param_path = os.path.join(base_dir, config_file)
    args_json_file_path = os.path.join(base_dir, json_file)
    env[wandb.env.SWEEP_PARAM_PATH] = sweep_param_path
    os.makedirs(os.path.dirname(sweep_param_path), exist_ok=True)
    config_util.save_config_file_from_dict(sweep_param_path, args)
    sweep_vars: dict[str, Any] = sweep_utils.create_sweep_command_args({"args": args})
    if "${args_json_file}" in sweep_command:
        with open(args_json_file_path, "w") as fp:
            fp.write(sweep_vars["args_json"][0])
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [sweep.get("program", "")]
    sweep_vars["args_json_file"] = [args_json_file_path]
    sweep_vars["env"] = ["/usr/bin/env"]
    command: list[str] = []
    for c in sweep_command:
        c = str(c)
        if c.startswith("${") and c.endswith("}"):
            command += sweep_vars.get(c[2:-1]) or []
        else:
            command += [c]
    return command, env


def _numbers(record: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}


def logged_metrics(search_root: Path, run_id: str) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(summary, history) of the fedpeft run with W&B id ``run_id`` (the run folder holding
    ``wandb/offline-run-*-<run_id>``), built as W&B builds them: the history is metrics.jsonl (what
    ``RunReporter.log_round`` logs every round), the summary each key's last logged value, then
    overwritten by ``results.json``'s ``summary`` (what ``RunReporter.write_final`` puts into the
    W&B summary; absent when the run did not finish)."""
    run_dir = fedpeft_run_dir(search_root, run_id)
    if run_dir is None:
        return {}, []
    history = [_numbers(json_value(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary: dict[str, float] = {}
    for record in history:
        summary.update(record)
    results = run_dir / "results.json"
    if results.is_file():
        summary.update(_numbers(json_value(results.read_text())["summary"]))
    return summary, history


def fedpeft_run_dir(search_root: Path, run_id: str) -> Path | None:
    """The run folder holding ``wandb/offline-run-*-<run_id>``, or None."""
    found = sorted(search_root.rglob(f"offline-run-*-{run_id}"))
    return found[0].parent.parent if found else None


def sweep_state(search_root: Path, run_id: str, code: int) -> str:
    """The run's state for the engine: ``failed`` when its process did not exit 0 or its
    results.json says ``status: failed`` (fedpeft.federation.verdict), as W&B records it; else ``finished``."""
    run_dir = fedpeft_run_dir(search_root, run_id)
    results = run_dir / "results.json" if run_dir is not None else None
    status = json_value(results.read_text()).get("status") if results is not None and results.is_file() else None
    return "failed" if code != 0 or status == "failed" else "finished"


def without_metric(metric: str, summary: dict[str, float], history: list[dict[str, float]]
                   ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """A failed run's summary and history without the sweep metric: its score ranks nothing (the
    engine imputes a failed run's value, e.g. bayes the worst of the sweep)."""
    return {k: v for k, v in summary.items() if k != metric}, [{k: v for k, v in h.items() if k != metric} for h in history]


def tuning_on_test_warning(metric: str, summary: dict[str, float]) -> str:
    """A warning when ``metric`` is a test score (``accuracy``, ``accuracy_mean``, ...) of a metric
    the run also reports as a validation score at the selected rounds; '' otherwise."""
    prefix = SELECTED_VAL.format("")
    for key in sorted(summary):
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name and (metric == name or metric.startswith(f"{name}_")):
            return (f"fedpeft.sweep: warning: metric.name '{metric}' is a TEST score; a sweep tuned on it reports "
                    f"test scores chosen on test. Tune on the validation score: metric: {{name: {key}, goal: ...}}")
    return ""


def run_sweep(sweep: dict[str, Any], count: int, engine_python: str, cwd: Path) -> list[dict[str, Any]]:
    """Run up to ``count`` proposals of the engine, one after the other, offline; returns the runs."""
    sweep_id = f"offline-{uuid.uuid4().hex[:8]}"
    metric = (sweep.get("metric") or {}).get("name")
    runs: list[dict[str, Any]] = []
    for _ in range(count):
        args = propose(engine_python, sweep, runs)
        if args is None:
            break
        run_id = uuid.uuid4().hex[:8]
        command, env = agent_command(sweep, args, run_id, sweep_id, str(cwd))
        env.setdefault("WANDB_MODE", "offline")
        print(f"fedpeft.sweep: run {len(runs) + 1}/{count} ({run_id}): {' '.join(command)}", flush=True)
        code = subprocess.run(command, env=env, cwd=cwd).returncode
        summary, history = logged_metrics(cwd, run_id)
        state = sweep_state(cwd, run_id, code)
        if metric and state == "failed":
            summary, history = without_metric(metric, summary, history)
        if metric and metric not in summary and state == "finished":
            raise SystemExit(f"fedpeft.sweep: metric.name '{metric}' was not logged by the run; fedpeft logs "
                             f"{', '.join(sorted(summary)) or 'nothing (is --wandb=offline in the command?)'}.")
        if metric and not runs and tuning_on_test_warning(metric, summary):
            print(tuning_on_test_warning(metric, summary), file=sys.stderr, flush=True)
        runs.append({"name": run_id, "state": state, "config": args,
                     "summary": summary, "history": history, "exitcode": code})
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="a W&B sweep file (YAML: program/command, method, metric, parameters)")
    parser.add_argument("--count", type=int, default=1, help="runs to start (a grid stops when it is done)")
    parser.add_argument("--engine-python", default=sys.executable, help="a Python that can import W&B's `sweeps` engine")
    args = parser.parse_args(argv)
    sweep = yaml.safe_load(Path(args.sweep).read_text())
    runs = run_sweep(sweep, args.count, args.engine_python, Path.cwd())
    metric = (sweep.get("metric") or {}).get("name")
    for run in runs:
        print(run["name"], run["state"], json.dumps({k: v["value"] for k, v in run["config"].items()}),
              f"{metric}={run['summary'].get(metric)}" if metric else "")
    print("fedpeft.sweep: upload the offline runs with `wandb sync runs/*/wandb/offline-run-*`")
    return 0 if all(r["exitcode"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
