"""Run folders that belong to themselves (issue 29): a moved folder resumes as it is; a copied
folder resumed beside its original is a run of its own and never writes into the original's
adapter store; a store outside the folder is bound to its run and its folder, and a copy that
claims it is refused with both paths named. Folders written before paths were relative (the
store as an absolute path in config.yaml) resume too.

In process (FederatedRun on the in-process grid, the real ClientApp): each run is "killed" in
round 3 (tests/test_resume.py), then moved or copied and resumed; every finished folder must
equal the uninterrupted run byte for byte (tests/test_resume.py's assert_same_results).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fedpeft.config import ConfigError
from fedpeft.federation.checkpoint import RunIdentity, resume_config
from fedpeft.federation.store import OWNER_FILE
from tests.inprocess_grid import run_in_process
from tests.test_resume import DriverKilled, KilledInRound3, assert_same_results, config


@pytest.fixture(scope="module")
def whole(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run every resumed folder must equal."""
    _, run = run_in_process(config(tiny_bert, tmp_path_factory.mktemp("whole"), "whole"))
    return run


def killed_run(tiny_bert: Path, out: Path, name: str, store: Path | None = None) -> Path:
    """A run folder whose driver died in round 3 (checkpoint of round 2; round-3 files in the store)."""
    cfg = config(tiny_bert, out, name)
    if store is not None:
        cfg.output.store_dir = str(store)
    with pytest.raises(DriverKilled):
        run_in_process(cfg, grid_class=KilledInRound3)
    return out / name


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def resume(folder: Path, *overrides: tuple[str, str]) -> Path:
    _, run = run_in_process(resume_config(folder, [], list(overrides)), resume=True)
    return run


def test_a_copied_run_folder_resumed_beside_its_original_is_a_run_of_its_own(tiny_bert, tmp_path, whole):
    """Before: config.yaml held the original's absolute adapters/ path and the copy had the same
    run id, so the copy's resume overwrote the original's adapters (then the original failed)."""
    original = killed_run(tiny_bert, tmp_path, "original")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    store_before = files(original / "adapters")
    assert resume(copy) == copy
    assert files(original / "adapters") == store_before  # the copy never wrote into the original's store
    assert resume(original) == original
    assert_same_results(copy, whole)
    assert_same_results(original, whole)  # the original's results are unchanged by its copy
    owners = [json.loads((run / "adapters" / OWNER_FILE).read_text())["run_dir"] for run in (original, copy)]
    assert owners == [str(original), str(copy)]  # separate stores, each bound to its own folder
    ours, theirs = RunIdentity.read(copy), RunIdentity.read(original)
    assert ours.copied_from == str(original) and ours.wandb_id != theirs.wandb_id  # its own W&B run
    assert sorted(files(copy / "adapters")) == sorted(files(original / "adapters"))  # each user's final adapter, twice
    assert yaml.safe_load((copy / "config.yaml").read_text())["output"]["store_dir"] == "adapters"  # relative


def test_a_moved_run_folder_resumes_as_it_is(tiny_bert, tmp_path, whole):
    """Before: the store was looked for at the old path, and the advice (set output.store_dir)
    was then refused as a config change."""
    before = killed_run(tiny_bert, tmp_path, "before")
    moved = tmp_path / "elsewhere" / "after"
    moved.parent.mkdir()
    before.rename(moved)
    assert resume(moved) == moved
    assert_same_results(moved, whole)
    assert json.loads((moved / "adapters" / OWNER_FILE).read_text())["run_dir"] == str(moved)


def old_form(run: Path) -> None:
    """config.yaml as the code before relative paths wrote it: the store as an absolute path."""
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["output"]["store_dir"] = str(run / "adapters")
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))


def test_folders_written_with_an_absolute_store_path_resume_moved_copied_and_in_place(tiny_bert, tmp_path, whole):
    """Folders in the old form (made by rewriting a new folder's config.yaml; a folder made by
    the previous commit's code was checked the same way by hand): moved, copied beside the
    original, and the original in place."""
    old = killed_run(tiny_bert, tmp_path, "old")
    old_form(old)
    copy = tmp_path / "old-copy"
    shutil.copytree(old, copy)
    store_before = files(old / "adapters")
    resume(copy)
    assert files(old / "adapters") == store_before
    resume(old)
    other = killed_run(tiny_bert, tmp_path, "other")
    old_form(other)
    moved = tmp_path / "other-moved"
    other.rename(moved)
    resume(moved)
    for run in (copy, old, moved):
        assert_same_results(run, whole)
        assert yaml.safe_load((run / "config.yaml").read_text())["output"]["store_dir"] == "adapters"  # relative now


def test_an_outside_store_is_bound_to_its_folder_a_copy_claiming_it_is_refused(tiny_bert, tmp_path, whole):
    """output.store_dir outside the run folder: a copy of the folder that would write into the
    original's store is refused, naming both folders; the store and the folder both moved, the
    run resumes with output.store_dir pointing at the store's new place (before: refused as a
    config change)."""
    store = tmp_path / "shared" / "store"
    original = killed_run(tiny_bert, tmp_path, "outside", store=store)
    assert yaml.safe_load((original / "config.yaml").read_text())["output"]["store_dir"] == str(store)
    copy = tmp_path / "outside-copy"
    shutil.copytree(original, copy)
    store_before = files(store)
    with pytest.raises(ConfigError) as refused:
        resume(copy)
    message = str(refused.value)
    assert "\n" not in message and str(copy) in message and str(original) in message and str(store) in message
    assert f"Resume {original} itself" in message and files(store) == store_before
    moved_store, moved_run = tmp_path / "moved-store", tmp_path / "outside-moved"
    store.rename(moved_store)
    original.rename(moved_run)
    assert resume(moved_run, ("output.store_dir", str(moved_store))) == moved_run
    assert_same_results(moved_run, whole)
    assert json.loads((moved_store / OWNER_FILE).read_text())["run_dir"] == str(moved_run)


def test_a_claim_copied_with_its_folder_is_not_a_live_run(tmp_path):
    """A folder copied while its run was alive carries that run's claim (a live pid on this
    host); before, the copy was refused as "in use"."""
    import os
    import socket

    from fedpeft.federation.checkpoint import CLAIM_FILE, claim_run_dir, release_run_dir

    copy = tmp_path / "copy"
    copy.mkdir()
    live = {"pid": os.getppid(), "host": socket.gethostname(), "started": "x", "run_dir": str(tmp_path / "original")}
    (copy / CLAIM_FILE).write_text(json.dumps(live))
    assert claim_run_dir(copy, exist_ok=True) is False
    assert json.loads((copy / CLAIM_FILE).read_text())["pid"] == os.getpid()
    release_run_dir(copy)
