"""A run survives its driver: checkpoints of every completed round, ``--resume RUN_DIR``, and
adapters of a round that never completed never leak into the resumed run.

In process (FederatedRun on the in-process grid, the real ClientApp): the driver is "killed" in
the middle of round 3, after some of its users have written their round-3 adapters. On Ray: the
real entry point in a subprocess, SIGKILLed during round 3 and resumed with W&B offline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedpeft.cli import config_from_args
from fedpeft.config import Config, ConfigError
from fedpeft.federation.checkpoint import Checkpoint, RunIdentity, resume_config
from fedpeft.federation.messages import TRAIN
from fedpeft.federation.store import AdapterStore
from tests.conftest import tiny_args
from tests.inprocess_grid import InProcessGrid, run_in_process


class DriverKilled(BaseException):
    """Stands for SIGKILL: nothing of the driver's own cleanup may run."""


class KilledInRound3(InProcessGrid):
    """Handles the first two train messages of round 3, then the driver dies."""

    def push_messages(self, messages):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == TRAIN and messages[0].content["run"]["round"] == 3:
            super().push_messages(messages[:2])
            raise DriverKilled()
        return super().push_messages(messages)


def config(tiny_bert: Path, out: Path, name: str, strategy: str = "fedavg", select: str = "final") -> Config:
    cfg = Config()
    cfg.federation.select = select
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds, cfg.federation.cohort_fraction = strategy, 4, 0.5
    cfg.federation.server_optimizer, cfg.federation.server_lr = "fedadam", 0.05
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 6, 8, 8
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 2, 4, 0.05
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(out), name, False
    return cfg


def scores(run: Path) -> list[dict]:
    """metrics.jsonl without its wall times."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_results(run: Path, reference: Path) -> None:
    assert (run / "per_user.csv").read_bytes() == (reference / "per_user.csv").read_bytes()
    assert (run / "shared_final.safetensors").read_bytes() == (reference / "shared_final.safetensors").read_bytes()
    assert (run / "predictions.jsonl").read_bytes() == (reference / "predictions.jsonl").read_bytes()
    assert (run / "rounds_per_user.jsonl").read_bytes() == (reference / "rounds_per_user.jsonl").read_bytes()
    assert scores(run) == scores(reference)


# fedsa: private B and head, which must not leak; best_val_per_user: rounds chosen on validation scores
# the killed run kept in rounds_per_user.jsonl
@pytest.mark.parametrize("strategy, select", [("fedavg", "final"), ("fedsa", "best_val_per_user")])
def test_a_run_killed_in_round_3_resumes_to_the_uninterrupted_results(strategy, select, tiny_bert, tmp_path):
    run_in_process(config(tiny_bert, tmp_path, "whole", strategy, select))
    with pytest.raises(DriverKilled):
        run_in_process(config(tiny_bert, tmp_path, "killed", strategy, select), grid_class=KilledInRound3)
    killed = tmp_path / "killed"
    assert Checkpoint.load(killed).round == 2 and len(scores(killed)) == 2
    store = AdapterStore(killed / "adapters")
    written_in_round_3 = [p for p in store.root.glob("*.r3.safetensors")]
    assert len(written_in_round_3) == 2  # what a resumed run must not start from

    resumed = resume_config(killed, [], [("output.progress", "false")])
    results, run = run_in_process(resumed, resume=True)
    assert run == killed and results["rounds"] == 4
    assert_same_results(killed, tmp_path / "whole")
    assert len(list(store.root.glob("*.safetensors"))) == 6  # at the end, each user's final adapter only


def test_resume_refuses_a_changed_config_and_names_the_keys(tiny_bert, tmp_path):
    with pytest.raises(DriverKilled):
        run_in_process(config(tiny_bert, tmp_path, "killed"), grid_class=KilledInRound3)
    run = tmp_path / "killed"
    with pytest.raises(ConfigError, match=r"train\.lr \(0\.05 -> 0\.1\).*federation\.rounds \(4 -> 5\)"):
        resume_config(run, [], [("train.lr", "0.1"), ("federation.rounds", "5")])
    allowed = resume_config(run, [], [("wandb.mode", "offline"), ("ray.client_cpus", "2"), ("output.progress", "true")])
    assert allowed.wandb.mode == "offline" and allowed.output.name == "killed"
    with pytest.raises(ConfigError, match="has no run.json"):
        (run / "run.json").unlink()
        from fedpeft.launch.prepare import prepare_run

        prepare_run(allowed, resume=True)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _sim(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedpeft.sim", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_everything_it_started(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process it started (its Ray), and nothing else."""
    family = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(family, timeout=30)


@pytest.mark.slow
def test_sigkill_during_round_3_then_resume_gives_the_uninterrupted_run(tiny_bert, tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    extra = ["--strategy", "fedavg", "--rounds", "4", "federation.cohort_fraction=0.5",
             "federation.server_optimizer=fedadam", "--wandb", "offline", "ray.num_cpus=2"]
    # the uninterrupted run: the same config in process (Ray runs equal it: tests/test_message_window.py)
    run_in_process(config_from_args(tiny_args(tiny_bert, tmp_path, "whole", *extra)))

    proc = _sim(tiny_args(tiny_bert, tmp_path, "killed", *extra), env)
    run = tmp_path / "killed"
    deadline = time.time() + 600
    try:  # round 3 has begun once a user's round-3 adapter is in the store
        while not list((run / "adapters").glob("*.r3.safetensors")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.05)
    finally:
        _kill_everything_it_started(proc)
    assert Checkpoint.load(run).round == 2 and not (run / "results.json").exists()

    resumed = _sim(["--resume", str(run), "output.progress=false"], env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert "resuming killed after round 2/4" in out or "after round 2" in out
    assert_same_results(run, tmp_path / "whole")
    wandb_id = RunIdentity.read(run).wandb_id  # the same W&B run, continued (offline: one folder per process)
    assert len(list((run / "wandb").glob(f"offline-run-*-{wandb_id}"))) == 2

    refused = subprocess.run([sys.executable, "-m", "fedpeft.sim", "--resume", str(run), "train.lr=0.5"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "train.lr" in refused.stderr
