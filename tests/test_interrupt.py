"""Ctrl-C and SIGTERM stop a run within seconds, cleanly, resumable (issue 18, item 3).

A real ``python -m fedpeft.sim`` on a local Ray gets a real signal in the middle of its rounds:
SIGINT to its whole process group (what Ctrl-C in a terminal does), or SIGTERM to the driver
alone (what a scheduler does). It must end within seconds with 130 or 143, without a
traceback, print the round it stopped after and the command that continues it, and leave no
process it started (Ray's included) behind: every process of the run inherits a marker in its
environment, and none may hold it afterwards. The resumed run then finishes from that round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from fedpeft.federation.checkpoint import Checkpoint

pytestmark = pytest.mark.slow
MARK = "FEDPEFT_INTERRUPT_TEST"


def marked_processes(token: str) -> list[str]:
    """The live processes whose environment holds ``MARK=token``, with their command lines."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"{MARK}={token}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                found.append(f"{proc.name}: {command[:120]}")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def completed_rounds(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if line.strip().endswith("}") and '"round"' in line)


ROUNDS = 20  # signalled after round 2: the rest is what a resume runs (a round takes well under a second)


def start_run(tiny_bert: Path, out: Path, token: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "fedpeft.sim", "--model", str(tiny_bert), "--out", str(out), "--name", "run",
            "--rounds", str(ROUNDS), "data.num_users=4", "data.train_per_user=8", "data.test_per_user=4", "train.steps=2",
            "train.batch_size=4", "ray.num_cpus=2", "output.progress=false"]
    env = {**os.environ, MARK: token}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal gives a command


def interrupt(proc: subprocess.Popen, run: Path, send) -> tuple[int, str, float]:
    deadline = time.time() + 300
    while completed_rounds(run / "metrics.jsonl") < 2:  # well inside the rounds
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run did not reach round 2 in 300 s"
        time.sleep(0.2)
    sent = time.time()
    send(proc)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the run did not end within 60 s of the signal; stderr: {err[-2000:]}")
    return proc.returncode, out + err, time.time() - sent


def check_clean_stop(rc: int, output: str, seconds: float, expected_rc: int, run: Path, token: str) -> int:
    assert rc == expected_rc, output[-3000:]
    assert seconds < 30, f"took {seconds:.1f} s to stop"
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    done = Checkpoint.saved_round(run)
    assert done >= 2
    assert f"interrupted after round {done}; continue with `python -m fedpeft.sim --resume {run}`" in output, output[-2000:]
    assert not (run / "results.json").exists()
    assert not (run / ".fedpeft-claim.json").exists()  # the folder is free for --resume
    deadline = time.time() + 15  # Ray's processes exit as the driver's shutdown reaches them
    while (left := marked_processes(token)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the run left behind: {left}"
    return done


def test_ctrl_c_stops_the_run_and_ray_with_exit_130(tiny_bert, tmp_path):
    """Before: a KeyboardInterrupt traceback, then the driver hung until a second Ctrl-C."""
    token = uuid.uuid4().hex
    proc = start_run(tiny_bert, tmp_path, token)
    rc, output, seconds = interrupt(proc, tmp_path / "run", lambda p: os.killpg(p.pid, signal.SIGINT))
    check_clean_stop(rc, output, seconds, 130, tmp_path / "run", token)


def test_sigterm_stops_the_run_with_exit_143_and_it_resumes(tiny_bert, tmp_path):
    """Before: exit 134 with Ray's traceback."""
    token = uuid.uuid4().hex
    proc = start_run(tiny_bert, tmp_path, token)
    rc, output, seconds = interrupt(proc, tmp_path / "run", lambda p: p.send_signal(signal.SIGTERM))
    done = check_clean_stop(rc, output, seconds, 143, tmp_path / "run", token)
    resumed = subprocess.run([sys.executable, "-m", "fedpeft.sim", "--resume", str(tmp_path / "run")],
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming run after round {done}/{ROUNDS}" in resumed.stdout + resumed.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["summary"]["n_failed"] == 0 and results["summary"]["n_undertrained"] == 0
