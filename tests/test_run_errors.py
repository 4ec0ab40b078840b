"""Issue 18, item 5: a clear one-line error, not a traceback or a wrong message, for a damaged
checkpoint, an output folder that cannot be written, a plug-in that raises on import, and two
runs started at once in the same run folder. Every case here fails before Ray starts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedpeft.cli import build_parser, config_from_args
from fedpeft.federation.checkpoint import CHECKPOINT_FILE, CLAIM_FILE, Checkpoint, RunIdentity
from fedpeft.federation.store import claim_store
from fedpeft.sim import main
from tests.conftest import tiny_args

REPO = Path(__file__).resolve().parents[1]


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert err.startswith("fedpeft: error: "), err
    return err


def test_resume_of_a_truncated_checkpoint_names_the_file_and_the_way_on(tiny_bert, tmp_path, capsys):
    """Before: safetensors' traceback (SafetensorError: ... incomplete metadata)."""
    config = config_from_args(tiny_args(tiny_bert, tmp_path, "cut"))
    run = tmp_path / "cut"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    identity = RunIdentity.new()
    identity.write(run)
    claim_store(run / "adapters", run, identity.run_id, [])
    Checkpoint(round=1, shared={"w": torch.ones(64, 64)}, progress={"last_round": [1] * 6}).save(run)
    path = run / CHECKPOINT_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # a copy or a disk that stopped half way
    assert main(["--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert str(path) in err and "damaged" in err and "not a whole" in err
    assert "start a new run" in err and "restore the file" in err
    assert path.read_bytes() == data[: len(data) // 2] and not (run / CLAIM_FILE).exists()  # nothing changed


def test_a_checkpoint_without_its_metadata_is_damaged_too(tmp_path):
    from safetensors.torch import save_file

    save_file({"shared/w": torch.ones(2)}, str(tmp_path / CHECKPOINT_FILE))  # a safetensors file, not fedpeft's
    with pytest.raises(Exception, match=r"damaged.*no 'round' in its metadata"):
        Checkpoint.load(tmp_path)


def test_an_output_folder_that_cannot_be_created_is_named(tiny_bert, tmp_path, capsys):
    """Before: PermissionError's traceback from mkdir. /sys refuses new folders even to root."""
    if os.access("/sys", os.W_OK) and not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs at /sys here, so no folder that refuses writes even to root")
    out = Path("/sys/fedpeft-test-out")
    assert main(tiny_args(tiny_bert, out, "ro")) == 2
    err = one_line_error(capsys)
    assert f"Cannot write the run folder {out / 'ro'}" in err and "not permitted" in err and "--out" in err


def test_a_file_where_the_output_folder_belongs_is_named(tiny_bert, tmp_path, capsys):
    """Before: FileExistsError's traceback from mkdir."""
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    assert main(tiny_args(tiny_bert, out, "x")) == 2
    err = one_line_error(capsys)
    assert f"Cannot write the run folder {out / 'x'}" in err and f"{out} is a file, not a folder" in err
    assert out.read_text() == "not a folder"


def bad_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"fedpeft_test_bad_plugin_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text("VALUE = 1\nraise RuntimeError('the lab config is missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_a_plugin_that_raises_on_import_is_one_line(tiny_bert, tmp_path, monkeypatch, capsys):
    """Before: the plug-in's RuntimeError escaped as a traceback (only ImportError was caught)."""
    name = bad_plugin(tmp_path, monkeypatch)
    assert main(tiny_args(tiny_bert, tmp_path, "p", f"plugins={name}")) == 2
    err = one_line_error(capsys)
    assert f"module '{name}'" in err and "RuntimeError: the lab config is missing" in err
    assert f"{name}.py:2" in err and "--debug" in err


def test_debug_prints_the_plugins_traceback(tiny_bert, tmp_path, monkeypatch, capsys):
    name = bad_plugin(tmp_path, monkeypatch)
    assert main(["--debug", *tiny_args(tiny_bert, tmp_path, "p", f"plugins={name}")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and f'{name}.py", line 2' in err and "RuntimeError: the lab config is missing" in err
    assert err.strip().splitlines()[-1].startswith("fedpeft: error: ")
    assert "--debug" in build_parser().format_help()


HOLD = """
import sys, time
from fedpeft.cli import config_from_args
from fedpeft.launch.prepare import prepare_run
prepare_run(config_from_args(sys.argv[1:]))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_the_same_folder_is_told_about_the_first(tiny_bert, tmp_path, capsys):
    """Before: both runs went on in one folder; the second, taking over the store's owner file,
    was told the store "holds the adapters of another run" (continue it with --resume), and the
    first run's workers then found the store not theirs, reported as a missing shared file system."""
    args = tiny_args(tiny_bert, tmp_path, "same")
    first = subprocess.Popen([sys.executable, "-c", HOLD, *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "ready"  # its folder and store are set up
        assert main(args) == 2
        err = one_line_error(capsys)
        run = (tmp_path / "same").resolve()
        assert f"run folder {run} is in use by another fedpeft run started at" in err
        assert f"(pid {first.pid} on host {socket.gethostname()})" in err and "another --name" in err
    finally:
        first.kill()
        first.wait()
    # the first run is gone: its claim no longer blocks the folder; what it left is judged as before
    from fedpeft.config import ConfigError
    from fedpeft.launch.prepare import prepare_run

    with pytest.raises(ConfigError, match="holds the adapters of another run"):
        prepare_run(config_from_args(args))
    assert not (run / CLAIM_FILE).exists()


RACE = """
import sys, time
from pathlib import Path
from fedpeft.federation.checkpoint import claim_run_dir
from fedpeft.config import ConfigError
start = float(sys.argv[2])
while time.time() < start:
    pass
try:
    claim_run_dir(Path(sys.argv[1]), exist_ok=True)
    print("claimed", flush=True)
except ConfigError as err:
    print("refused" if "in use by another fedpeft run" in str(err) else err, flush=True)
time.sleep(float(sys.argv[3]))
"""


def test_of_runs_started_at_once_exactly_one_claims_the_folder(tmp_path):
    run = tmp_path / "race"
    start = time.time() + 8  # after every process has imported fedpeft
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(run), str(start), "3"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
             for _ in range(3)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["claimed", "refused", "refused"], outs
    assert time.time() > start, "the processes started late; the race was not a race"


def test_a_claim_left_by_a_dead_run_is_taken_over(tmp_path):
    from fedpeft.federation.checkpoint import claim_run_dir, release_run_dir

    run = tmp_path / "left"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / CLAIM_FILE).write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}", "started": "x"}}')
    assert claim_run_dir(run, exist_ok=True) is False  # the folder was there already
    assert f'"pid": {os.getpid()}' in (run / CLAIM_FILE).read_text()
    release_run_dir(run)
    assert not (run / CLAIM_FILE).exists()
    (run / CLAIM_FILE).write_text('{"pid": 1, "host": "another-host", "started": "x"}')  # no pid to check there
    with pytest.raises(Exception, match=f"pid 1 on host another-host.*delete {run / CLAIM_FILE}"):
        claim_run_dir(run, exist_ok=True)


def test_resume_of_a_finished_run_says_it_is_complete_and_changes_nothing(tiny_bert, tmp_path, capsys):
    """Issue 18, item 6. Before: Ray started again and results.json was rewritten with its
    per-round timings emptied."""
    import ray

    from fedpeft.federation.reporting import summary_table
    from fedpeft.files import json_value
    from tests.inprocess_grid import run_in_process

    config = config_from_args(tiny_args(tiny_bert, tmp_path, "done"))
    results, run = run_in_process(config)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    assert results["timings"]["rounds_s"]  # what a re-run used to empty
    capsys.readouterr()
    assert main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"fedpeft: {run} is complete (all 2 rounds, and its results.json); nothing was run or changed" in out
    assert summary_table(json_value((run / "results.json").read_text())) in out  # the finished run's summary
    assert not ray.is_initialized()
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}
    assert after == before
