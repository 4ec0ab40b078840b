"""A full disk stops the run; it never becomes a "successful" one (issue 18, item 1).

A real small tmpfs, mounted by the test (skipped, with the reason, where this process may not
mount one), is filled to the last byte in the middle of a run: first under the adapter store
(the workers' writes fail), then under the run folder (the driver's own writes fail). Either way
the run stops with a message that names the folder and its free space, the checkpoint keeps the
last complete round, and once space is freed ``--resume`` finishes the run with every user
trained for every round it was scheduled.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from fedpeft.config import Config
from fedpeft.federation.checkpoint import Checkpoint
from fedpeft.federation.server_app import FederatedRun, StorageFailure
from fedpeft.files import storage_errno
from tests.inprocess_grid import run_in_process


@pytest.fixture
def tmpfs(tmp_path: Path):
    """A 4 MB tmpfs at ``tmp_path / "disk"``, unmounted at the end."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path) -> Path:
    """Write a file into ``folder`` until the file system has no byte left."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):  # big writes, then smaller ones for what is left
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    return filler


def tiny_config(tiny_bert: Path, out: Path, store: Path | None = None) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds = "fedavg", 3
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 4, 8, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 2, 4, 0.05
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(out), "full", False
    if store is not None:
        cfg.output.store_dir = str(store)
    return cfg


def fill_at_round(monkeypatch, folder: Path, server_round: int, before: bool) -> list[Path]:
    """Fill ``folder``'s file system just before (or just after) the training of ``server_round``."""
    fillers: list[Path] = []
    original = FederatedRun.train_round

    def train_round(self, r, phase):
        if r == server_round and before:
            fillers.append(fill(folder))
        record = original(self, r, phase)
        if r == server_round and not before:
            fillers.append(fill(folder))
        return record

    monkeypatch.setattr(FederatedRun, "train_round", train_round)
    return fillers


def rows(run: Path) -> list[dict[str, str]]:
    with (run / "per_user.csv").open() as f:
        return list(csv.DictReader(f))


def check_stopped_then_resumed(cfg: Config, run: Path, err: StorageFailure, folder: Path, fillers: list[Path], monkeypatch):
    message = str(err)
    assert str(folder) in message and "no space left on the device" in message, message
    assert "free of" in message and "last complete round (1/3)" in message, message
    assert f"--resume {run}" in message, message
    assert Checkpoint.load(run).round == 1  # round 2 was never checkpointed
    assert not (run / "results.json").exists()  # nothing that looks like a finished run
    # the per-round files hold what the checkpoint holds (issue 29; before, metrics.jsonl kept round 2)
    for name in ("metrics.jsonl", "rounds_per_user.jsonl"):
        assert {json.loads(line)["round"] for line in (run / name).read_text().splitlines()} == {1}, name
    monkeypatch.undo()
    for filler in fillers:
        filler.unlink()
    results, _ = run_in_process(cfg, resume=True)
    table = rows(run)
    assert all(r["status"] == "ok" and r["rounds_trained"] == "3" == r["rounds_scheduled"] for r in table), table
    assert results["summary"]["n_failed"] == 0 and results["summary"]["n_undertrained"] == 0
    assert results["failed_calls"] == 0  # the full disk was never any user's failure


def test_a_full_adapter_store_stops_the_run_before_its_checkpoint(tiny_bert, tmp_path, tmpfs, monkeypatch):
    """Before: every write failed as that user's failure, rounds went on with nobody trained, and
    --resume reported a complete run with "users failed 0"."""
    cfg = tiny_config(tiny_bert, tmp_path / "out", store=tmpfs / "adapters")
    fillers = fill_at_round(monkeypatch, tmpfs, 2, before=True)
    with pytest.raises(StorageFailure) as err:
        run_in_process(cfg)
    assert err.value.code == errno.ENOSPC
    assert "train call(s) of round 2 could not write" in str(err.value)
    check_stopped_then_resumed(cfg, tmp_path / "out" / "full", err.value, tmpfs / "adapters", fillers, monkeypatch)


def test_a_full_run_folder_stops_the_run_before_its_checkpoint(tiny_bert, tmp_path, tmpfs, monkeypatch):
    """The driver's own writes (metrics.jsonl, the checkpoint) fail after round 2 trained."""
    cfg = tiny_config(tiny_bert, tmpfs, store=tmp_path / "adapters")
    fillers = fill_at_round(monkeypatch, tmpfs, 2, before=False)
    with pytest.raises(StorageFailure) as err:
        run_in_process(cfg)
    check_stopped_then_resumed(cfg, tmpfs / "full", err.value, tmpfs / "full", fillers, monkeypatch)


def test_storage_errors_are_told_apart_from_a_users_own():
    from safetensors import SafetensorError

    assert storage_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert storage_errno(OSError(errno.EROFS, "ro")) == errno.EROFS
    assert storage_errno(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")) == 28
    try:
        try:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert storage_errno(outer) == errno.EIO
    assert storage_errno(OSError(errno.ENOENT, "missing")) is None  # a missing file is not the disk's fault
    assert storage_errno(ValueError("bad label")) is None
