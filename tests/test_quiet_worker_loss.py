"""Issue 29: a call that ``federation.call_timeout`` ends used to print Flower's ERROR records
with a Ray traceback (three per call that reached the lost worker, restarts included), even
when the run succeeds. They are dropped; the failure is still recorded and counted, and every
other error Flower logs still shows."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.logger import log

from fedpeft.config import Config
from tests.inprocess_grid import run_in_process
from tests.test_faults import faulty  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_flowers_records_about_a_lost_worker_are_dropped_and_other_errors_kept(tiny_bert, tmp_path):
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    cfg = Config()
    cfg.model.name, cfg.output.dir, cfg.output.name, cfg.output.progress = str(tiny_bert), str(tmp_path), "r", False
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 4, 4, 4
    cfg.federation.rounds, cfg.train.steps, cfg.train.batch_size = 1, 1, 4
    run_in_process(cfg)  # the ServerApp's code path (run_prepared), as both entry points run it
    records = Records()
    flower = logging.getLogger("flwr")
    flower.addHandler(records)
    try:
        for lost in (ActorUnavailableError("The actor is restarting", None), ActorDiedError()):
            try:
                raise lost
            except Exception as ex:  # as Flower's simulation engine logs it (vce_api.worker)
                log(logging.ERROR, "An exception was raised when processing a message by RayBackend")
                log(logging.ERROR, ex)
        try:
            raise RuntimeError("a ClientApp that raised")
        except RuntimeError as ex:
            log(logging.ERROR, ex)
        log(logging.ERROR, "an error outside any exception")
    finally:
        flower.removeHandler(records)
    assert records.messages == ["a ClientApp that raised", "an error outside any exception"]


@pytest.mark.slow
def test_a_call_timeout_leaves_no_traceback_and_is_still_recorded(faulty, tiny_bert, tmp_path):  # noqa: F811
    """``python -m fedpeft.sim`` as a user runs it (its own process: what reaches its stderr)."""
    args = faulty("hanging", ["hang-2"], str(tiny_bert), "--rounds", "1", "federation.call_timeout=25",
                  "federation.max_failed_fraction=0.5")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "fedpeft.sim", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert "Traceback" not in err and "ActorUnavailableError" not in err and "ActorDiedError" not in err, err
    assert "An exception was raised when processing a message" not in err, err
    assert "fedpeft: a train call of user 2 ran longer than federation.call_timeout=25 s" in err  # fedpeft's own line
    history = json.loads((tmp_path / "hanging" / "failures.json").read_text())
    assert [(f["user_id"], f["round"], f["call"]) for f in history] == [("user0002", 1, "train")]
    results = json.loads((tmp_path / "hanging" / "results.json").read_text())
    assert results["status_counts"]["undertrained"] == 1 and results["status"] == "degraded"
    assert "1 call(s) failed during the run" in done.stdout
