"""Studies that stop cleanly, resume and are checked before any compute (issue 29).

The study scripts run as from the shell, their runs on the in-process grid instead of Ray
(tests/study_in_process.py replaces fedpeft.sim.run, which the studies call for each run): a
comparison gets a real SIGINT in its third run, then ``--resume`` finishes it, and its
comparison.csv must equal an uninterrupted comparison's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import fedpeft.sim
from fedpeft.federation.checkpoint import Checkpoint
from tests.study_in_process import run as run_in_process_grid

ROOT = Path(__file__).resolve().parents[1]
WALL = "wall_seconds"  # a run's own wall time: the one column that differs between two runs of the same config


def study_args(model: Path, out: Path, *extra: str) -> list[str]:
    """A two-strategy, two-seed comparison on the tiny model: local_only-seed0, fedavg-seed0,
    local_only-seed1, fedavg-seed1 (in that order), 6 rounds each."""
    return ["--strategies", "fedavg", "--seeds", "0,1", "--model", str(model), "--rounds", "6", "data.num_users=4",
            "data.train_per_user=8", "data.val_per_user=2", "data.test_per_user=4", "train.steps=2",
            "train.batch_size=4", "output.progress=false", "--compare-out", str(out), *extra]


def in_process(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """fedpeft.sim.run on the in-process grid in this process; returns the (run folder, resume) of each call."""
    calls: list[tuple[str, bool]] = []

    def run(config, resume=False):
        calls.append((config.output.name, resume))
        return run_in_process_grid(config, resume)

    monkeypatch.setattr(fedpeft.sim, "run", run)
    return calls


def without_wall_time(path: Path) -> str:
    """comparison.csv with its wall_seconds column left out, as text."""
    rows = list(csv.reader(io.StringIO(path.read_text())))
    keep = [i for i, name in enumerate(rows[0]) if name != WALL]
    assert len(keep) == len(rows[0]) - 1
    out = io.StringIO()
    csv.writer(out).writerows([[row[i] for i in keep] for row in rows])
    return out.getvalue()


def test_a_comparison_interrupted_in_its_third_run_resumes_to_the_uninterrupted_comparison(tiny_bert, tmp_path, monkeypatch):
    """Before: Ctrl-C gave a KeyboardInterrupt traceback (on Ray, then a wait of minutes), and the
    comparison could not be continued or re-reported (--resume was refused)."""
    from fedpeft.study.compare import main

    calls = in_process(monkeypatch)
    assert main(study_args(tiny_bert, tmp_path / "whole")) == 0
    assert [c for c, _ in calls] == ["local_only-seed0", "fedavg-seed0", "local_only-seed1", "fedavg-seed1"]

    study = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "tests.study_in_process", "sims/compare.py", *study_args(tiny_bert, study)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    third = study / "local_only-seed1"
    deadline = time.time() + 600
    while Checkpoint.saved_round(third) < 1:  # inside the third run, a round done, five to go
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the study did not reach its third run in 600 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the study did not end within 60 s of SIGINT: {proc.communicate()[1][-2000:]}")
    assert proc.returncode == 130, out[-2000:] + err[-3000:]
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    done = Checkpoint.saved_round(third)
    assert 1 <= done < 6 and not (third / "results.json").exists()
    assert err.strip().splitlines()[-1] == (f"fedpeft: interrupted in run local_only-seed1 after its round {done}; "
                                            f"continue the study with `python sims/compare.py --resume {study}`")
    assert not (study / "fedavg-seed1").exists() and not (study / "comparison.csv").exists()

    # --report-only: what is there, the two runs not finished listed as such; nothing runs
    calls.clear()
    assert main(["--report-only", str(study)]) == 0
    assert calls == [] and not (study / "fedavg-seed1").exists()
    status = {r["folder"]: r for r in csv.DictReader((study / "runs.csv").open())}
    assert status["local_only-seed1"]["status_reason"] == f"not run (unfinished: stopped after round {done} of 6)"
    assert status["fedavg-seed1"]["status_reason"] == "not run (missing: not run yet)"
    assert status["fedavg-seed0"]["status"] == "ok"

    # --resume: the finished runs kept, the third continued from its checkpoint, the fourth run
    assert main(["--resume", str(study)]) == 0
    assert calls == [("local_only-seed1", True), ("fedavg-seed1", False)]
    assert json.loads((third / "results.json").read_text())["rounds"] == 6
    assert without_wall_time(study / "comparison.csv") == without_wall_time(tmp_path / "whole" / "comparison.csv")
    for same in ("per_user.csv", "runs.csv", "by_activity.csv"):
        assert (study / same).read_bytes() == (tmp_path / "whole" / same).read_bytes(), same


def test_resume_refuses_other_arguments_naming_them_and_report_only_runs_nothing(tiny_bert, tmp_path, monkeypatch, capsys):
    """Before: --resume and --report-only were refused as options of python -m fedpeft.sim."""
    from fedpeft.study.compare import main

    calls = in_process(monkeypatch)
    study = tmp_path / "study"
    args = study_args(tiny_bert, study)
    args[args.index("--seeds") + 1], args[args.index("--rounds") + 1] = "0", "1"
    assert main(args) == 0
    assert calls == [("local_only", False), ("fedavg", False)]
    record = json.loads((study / "study.json").read_text())
    assert record["study"] == "sims/compare.py" and record["config"]["compare"]["strategies"] == ["fedavg"]
    first = without_wall_time(study / "comparison.csv")
    calls.clear()
    capsys.readouterr()
    for argv, named in ((["--strategies", "fedsa", "train.lr=0.5"], ["compare.strategies (['fedavg'] -> ['fedsa'])",
                                                                     "train.lr (", " -> 0.5)"]),
                        (["--compare-out", str(tmp_path / "x")], ["leave --compare-out out"])):
        assert main(["--resume", str(study), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(n in err for n in named), err
    # keys that do not change results may differ; everything finished is kept, nothing runs
    assert main(["--resume", str(study), "ray.num_cpus=1"]) == 0
    assert main(["--report-only", str(study)]) == 0
    assert calls == [] and without_wall_time(study / "comparison.csv") == first
    (study / "study.json").unlink()
    capsys.readouterr()
    assert main(["--resume", str(study)]) == 2
    assert "no study.json there" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_a_comparison_on_ray_within_seconds_and_leaves_no_process(tiny_bert, tmp_path):
    """The real script on a local Ray. Before: a KeyboardInterrupt traceback, then the process
    waited at exit for Flower's ServerApp thread (not a daemon), which waited for replies from
    the actors Ray's shutdown had ended, for up to 1.2 x federation.call_timeout + 120 s."""
    from tests.test_interrupt import MARK, marked_processes

    token, study = uuid.uuid4().hex, tmp_path / "study"
    args = [a for a in study_args(tiny_bert, study, "ray.num_cpus=2") if a not in ("--seeds", "0,1")]
    args[args.index("--rounds") + 1] = "40"
    proc = subprocess.Popen([sys.executable, "sims/compare.py", *args], cwd=ROOT, env={**os.environ, MARK: token},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    first = study / "local_only"
    deadline = time.time() + 600
    while Checkpoint.saved_round(first) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the study did not reach round 2 in 600 s"
        time.sleep(0.2)
    sent = time.time()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the study did not end within 60 s of SIGINT: {proc.communicate()[1][-2000:]}")
    seconds = time.time() - sent
    assert proc.returncode == 130 and seconds < 30, (seconds, err[-3000:])
    assert "Traceback" not in out + err and "KeyboardInterrupt" not in out + err, err[-3000:]
    done = Checkpoint.saved_round(first)
    assert err.strip().splitlines()[-1] == (f"fedpeft: interrupted in run local_only after its round {done}; "
                                            f"continue the study with `python sims/compare.py --resume {study}`")
    deadline = time.time() + 15
    while (left := marked_processes(token)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the study left behind: {left}"
