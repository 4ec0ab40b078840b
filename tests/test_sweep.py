"""W&B sweeps against W&B's own sweep engine (the `sweeps` package, in a venv of its own since it
pins numpy < 2): the README's sweep (one proposal) and a bayes variant (two), every one run as the
exact command ``wandb agent`` builds (W&B offline, tiny model), its logged metric fed back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedpeft.config import Config, ConfigError
from fedpeft.launch.assemble import apply_sweep_parameters
from fedpeft.sweep import agent_command, logged_metrics, run_sweep, tuning_on_test_warning

README = Path(__file__).resolve().parents[1] / "README.md"
ENGINE_VENV = Path(os.environ.get("FEDPEFT_SWEEPS_VENV", Path.home() / ".cache" / "fedpeft-test-sweeps"))


def readme_sweep() -> dict:
    (block,) = re.findall(r"```yaml\n(# sweep\.yaml.*?)```", README.read_text(), flags=re.S)
    return yaml.safe_load(block)


def engine_python() -> str:
    """A venv with W&B's engine, made once and kept under ~/.cache (pip install sweeps)."""
    python = ENGINE_VENV / "bin" / "python"
    if subprocess.run([str(python), "-c", "import sweeps"], capture_output=True).returncode if python.exists() else True:
        subprocess.run([sys.executable, "-m", "venv", str(ENGINE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "sweeps==0.3.0"], check=True)
    return str(python)


def test_agent_command_is_wandbs_and_sweep_parameters_reach_the_config(tmp_path, monkeypatch):
    sweep = {**readme_sweep(), "command": ["${env}", "python", "-m", "fedpeft.sim", "--wandb=offline", "${args_json_file}"]}
    command, env = agent_command(sweep, {"train.lr": {"value": 0.25}, "peft.r": {"value": 4}}, "r1", "s1", str(tmp_path))
    assert command[:5] == ["/usr/bin/env", "python", "-m", "fedpeft.sim", "--wandb=offline"]
    assert json.loads(Path(command[5]).read_text()) == {"train.lr": 0.25, "peft.r": 4}
    assert env["WANDB_SWEEP_ID"] == "s1" and env["WANDB_RUN_ID"] == "r1"
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", env["WANDB_SWEEP_PARAM_PATH"])
    monkeypatch.setenv("WANDB_SWEEP_ID", "s1")
    config = Config()
    config.wandb.mode = "offline"
    config = apply_sweep_parameters(config)  # no ${args}: the values come from the agent's file only
    assert (config.train.lr, config.peft.r) == (0.25, 4)
    config.wandb.mode = "disabled"
    with pytest.raises(ConfigError, match="--wandb=online"):
        apply_sweep_parameters(config)
    _, env = agent_command(sweep, {"lr": {"value": 0.1}}, "r2", "s1", str(tmp_path))
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", env["WANDB_SWEEP_PARAM_PATH"])
    with pytest.raises(ConfigError, match="Unknown config key 'lr'.*W&B sweep parameter.*train.lr"):
        apply_sweep_parameters(Config())


def test_logged_metrics_are_the_runs_wandb_summary_and_history(tmp_path):
    """What the offline engine gets, built as W&B builds a run's summary: each key's last logged
    value (metrics.jsonl), overwritten by results.json's summary (RunReporter.write_final); a run
    that did not finish has no results.json, and the history alone makes its summary."""
    run = tmp_path / "runs" / "r"
    (run / "wandb" / "offline-run-20260101_000000-abc123").mkdir(parents=True)
    lines = [{"round": 1, "phase": "federated", "accuracy": 0.5, "val_accuracy": 0.4, "train_loss": 1.0},
             {"round": 2, "phase": "federated", "train_loss": 0.5}]  # round 2 not evaluated
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary, history = logged_metrics(tmp_path, "abc123")
    assert history == [{"round": 1, "accuracy": 0.5, "val_accuracy": 0.4, "train_loss": 1.0}, {"round": 2, "train_loss": 0.5}]
    assert summary == {"round": 2, "accuracy": 0.5, "val_accuracy": 0.4, "train_loss": 0.5}
    (run / "results.json").write_text(json.dumps({"summary": {"accuracy": 0.75, "selected_val_accuracy": 0.6, "n_failed": 0}}))
    summary, _ = logged_metrics(tmp_path, "abc123")
    assert summary == {"round": 2, "accuracy": 0.75, "val_accuracy": 0.4, "train_loss": 0.5, "selected_val_accuracy": 0.6,
                       "n_failed": 0}
    assert logged_metrics(tmp_path, "other") == ({}, [])
    # tuning on a test score is named as such, with the validation score to use instead
    for test_score in ("accuracy", "accuracy_mean", "accuracy_p10"):
        assert "selected_val_accuracy" in tuning_on_test_warning(test_score, summary)
    assert tuning_on_test_warning("selected_val_accuracy", summary) == tuning_on_test_warning("val_accuracy", summary) == ""


TINY = {"model.name": None, "data.num_users": 2, "data.train_per_user": 8, "data.val_per_user": 2,
        "data.test_per_user": 4, "federation.rounds": 1, "train.steps": 1, "train.batch_size": 4,
        "output.progress": False, "ray.num_cpus": 2}


@pytest.mark.slow
def test_readme_sweep_and_a_bayes_sweep_run_with_wandbs_engine(tiny_bert, tmp_path, monkeypatch):
    python = engine_python()
    constants = {k: {"value": str(tiny_bert) if v is None else v} for k, v in TINY.items()}
    grid = readme_sweep()
    grid["parameters"] = {**grid["parameters"], **constants}
    bayes = {**grid, "method": "bayes", "metric": {"name": "selected_val_accuracy", "goal": "maximize"},
             "parameters": {"train.lr": {"min": 0.001, "max": 0.01}, "peft.r": {"values": [4, 8]}, **constants}}
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # the README's grid: one run (its proposals do not depend on results); bayes: two, its second
    # proposal made from the first run's logged metric
    for sweep, count in ((grid, 1), (bayes, 2)):
        runs = run_sweep(sweep, count, python, tmp_path)
        assert len(runs) == count and all(r["exitcode"] == 0 for r in runs), runs
        for run in runs:
            (offline,) = tmp_path.rglob(f"offline-run-*-{run['name']}")  # the agent's run id is the W&B run
            ran = yaml.safe_load((offline.parent.parent / "config.yaml").read_text())
            assert ran["train"]["lr"] == float(run["config"]["train.lr"]["value"])
            assert ran["peft"]["r"] == run["config"]["peft.r"]["value"]
            assert 0 <= run["summary"]["accuracy_mean"] <= 1
            # the engine got the run's validation score at the selected round, as a W&B agent would
            summary = json.loads((offline.parent.parent / "results.json").read_text())["summary"]
            assert run["summary"]["selected_val_accuracy"] == summary["selected_val_accuracy"]
            assert 0 <= run["summary"]["selected_val_accuracy"] <= 1
