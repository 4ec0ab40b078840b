"""Faults on real Ray: a user whose data fails, a worker process that dies mid-call and calls
that hang are that user's failure for the round; the run goes on and every other user is scored.
A worker that cannot see the run's adapter store stops the run before any training.

The faults come from a benchmark registered by a module this test writes and names in the
``plugins`` key, so that the driver and every Ray worker import it: its ``load_user`` raises,
ends its own process (``os._exit``) or hangs for the users that ``data.path`` lists.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedpeft.sim import main
from tests.conftest import tiny_args

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

PLUGIN = '''
import os
import time
from pathlib import Path

from fedpeft.data import register_benchmark
from fedpeft.data.synthetic import SyntheticBenchmark


@register_benchmark
class FaultyBenchmark(SyntheticBenchmark):
    """The synthetic users; data.path/<fault>-<index> makes that user's load_user fail."""

    name = "faulty-test"

    def load_user(self, index):
        plan = Path(self.config.data.path)
        if (plan / f"raise-{index}").exists():
            raise RuntimeError(f"injected failure of user {index}")
        if (plan / f"exit-{index}").exists():
            os._exit(1)  # the worker process dies mid-call
        if (plan / f"hang-{index}").exists():
            (plan / f"hang-{index}").unlink()  # its first call only
            time.sleep(3600)  # never answers: federation.call_timeout bounds the call
        return super().load_user(index)
'''


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    """A plugin module on the path of the driver and (through Flower's PYTHONPATH) of every worker."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "fedpeft_faulty_benchmark.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(plugins))
    plan = tmp_path / "plan"
    plan.mkdir()

    def args(name: str, faults: list[str], *extra: str) -> list[str]:
        for fault in faults:
            (plan / fault).write_text("")
        return tiny_args(Path(extra[0]), tmp_path, name, "plugins=fedpeft_faulty_benchmark", "data.benchmark=faulty-test",
                         f"data.path={plan}", "--strategy", "fedavg", *extra[1:])

    return args


def _rows(run: Path) -> dict[str, dict]:
    with (run / "per_user.csv").open() as f:
        return {r["user_id"]: r for r in csv.DictReader(f)}


def test_a_failing_user_and_a_dying_worker_are_failures_and_the_run_goes_on(faulty, tiny_bert, tmp_path, ray_shutdown):
    # 2 of 6 users fail: the run goes on, and is degraded, not failed, under a limit of 0.5 (issue 28)
    assert main(faulty("dying", ["raise-1", "exit-4"], str(tiny_bert), "federation.max_failed_fraction=0.5")) == 0
    run = tmp_path / "dying"
    rows = _rows(run)
    assert rows["user0001"]["status"] == "failed" and "injected failure of user 1" in rows["user0001"]["error"]
    assert rows["user0004"]["status"] == "failed" and "worker process died mid-call" in rows["user0004"]["error"]
    ok = [u for u in rows if u not in ("user0001", "user0004")]
    assert all(rows[u]["status"] == "ok" and rows[u]["rounds_trained"] == "2" for u in ok)  # every other user scored
    results = json.loads((run / "results.json").read_text())
    assert results["summary"]["n_failed"] == 2 and results["summary"]["n_evaluated"] == 4
    history = json.loads((run / "failures.json").read_text())
    died = [(f["round"], f["call"]) for f in history if f["user_id"] == "user0004"]
    assert died == [(1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate")]  # each of its calls, no other user's
    assert {f["user_id"] for f in history} == {"user0001", "user0004"}  # later calls did not land on a dead worker


def test_a_call_that_hangs_is_bounded_by_the_call_timeout_without_traceback_noise(faulty, tiny_bert, tmp_path):
    """User 2's first call never answers; the call is ended after federation.call_timeout, its
    worker replaced, and the user's next call (the evaluation) runs as usual. Run as a user runs
    ``python -m fedpeft.sim`` (its own process: what reaches its stderr): before, Flower's ERROR
    records with a Ray traceback were printed even when the run succeeded (issue 29)."""
    # a worker imports and builds its model as its process starts (fedpeft.federation.client_app.warm_up), not in
    # its first call, so 25 s leaves a loaded machine's ordinary calls (under a second here) far below it
    args = faulty("hanging", ["hang-2"], str(tiny_bert), "--rounds", "1", "federation.call_timeout=25",
                  "federation.max_failed_fraction=0.5")  # 1 of 6 undertrained: degraded (issue 28)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "plugins"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "fedpeft.sim", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    assert "Traceback" not in err and "ActorUnavailableError" not in err and "ActorDiedError" not in err, err
    assert "An exception was raised when processing a message" not in err, err
    assert "fedpeft: a train call of user 2 ran longer than federation.call_timeout=25 s" in err  # fedpeft's own line
    assert "1 call(s) failed during the run" in done.stdout
    run = tmp_path / "hanging"
    history = json.loads((run / "failures.json").read_text())
    assert [(f["user_id"], f["round"], f["call"]) for f in history] == [("user0002", 1, "train")]
    assert "longer than federation.call_timeout=25 s; its worker process was ended and replaced" in history[0]["error"]
    results = json.loads((run / "results.json").read_text())
    assert results["status_counts"]["undertrained"] == 1 and results["status"] == "degraded"
    rows = _rows(run)
    assert all(r["status"] == "ok" for r in rows.values())  # scored at the end, the other users untouched
    assert rows["user0002"]["rounds_trained"] == "0" and rows["user0002"]["failed_calls"] == "1"
