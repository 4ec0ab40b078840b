"""Issue 29, item 6 (and 5, 7): what used to be a traceback, a hang or a silent change is one
line naming what was wrong and what to do, before Ray starts: a client larger than the local
Ray, a cohort larger than the users who train, a model folder without weights, a lone surrogate
in a benchmark's text, a cache folder that cannot be written. (A client larger than every node
of a running cluster: tests/test_ray_cluster.py, on a real one.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fedpeft.cli import config_from_args
from fedpeft.config import ConfigError
from fedpeft.launch.prepare import prepare_run
from fedpeft.learning.model_files import check_model
from fedpeft.sim import main
from tests.conftest import tiny_args
from tests.test_data_checks import RayStarted, refuse_ray, user_json, write_prepared  # noqa: F401
from tests.test_model_checks import model_config
from tests.test_run_errors import one_line_error

GOOD = ["Hateful", "Non-hateful", "Hateful", "Non-hateful"]


# ----------------------------------------------------------------------------- a client larger than the local Ray


def test_a_client_with_more_cpus_than_the_local_ray_is_refused_before_ray_starts(tiny_bert, tmp_path, capsys, monkeypatch):
    """Before: Flower's "ActorPool is empty" tracebacks, then the run waited forever."""
    refuse_ray(monkeypatch)
    assert main(tiny_args(tiny_bert, tmp_path, "big", "ray.num_cpus=2", "ray.client_cpus=3")) == 2
    err = one_line_error(capsys)
    assert "needs ray.client_cpus=3 on one node" in err and "the local Ray (ray.num_cpus=2)" in err, err
    assert "(2 CPUs, 0 GPUs)" in err and "ray.client_cpus=2 or less" in err and "wait forever" in err, err
    assert not (tmp_path / "big").exists()


def test_a_client_with_more_gpus_than_this_machine_has_is_refused(tiny_bert, tmp_path, capsys, monkeypatch):
    import torch

    gpus = torch.cuda.device_count()  # 0 on a CPU machine: then no GPU at all
    refuse_ray(monkeypatch)
    assert main(tiny_args(tiny_bert, tmp_path, "gpu", f"ray.client_gpus={gpus + 1}")) == 2
    err = one_line_error(capsys)
    assert f"ray.client_cpus=1 and ray.client_gpus={gpus + 1} on one node" in err, err
    assert f"(2 CPUs, {gpus} GPU" in err, err
    assert (f"ray.client_gpus={gpus} or less" if gpus else "ray.client_gpus=0 (clients on the CPU)") in err, err


def test_all_cores_are_named_as_ray_counts_them(tiny_bert, tmp_path, capsys, monkeypatch):
    from ray._private.utils import get_num_cpus  # what ray.init(num_cpus=None) gives the local node

    cores = get_num_cpus()
    refuse_ray(monkeypatch)
    assert main(tiny_args(tiny_bert, tmp_path, "all", "ray.num_cpus=0", f"ray.client_cpus={cores + 0.5}")) == 2
    err = one_line_error(capsys)
    assert f"the local Ray (all of this machine's cores) has no such node ({cores:g} CPUs" in err, err


def test_a_client_that_fits_goes_on_to_start_ray(tiny_bert, tmp_path, monkeypatch):
    refuse_ray(monkeypatch)
    with pytest.raises(RayStarted):  # the check let it through: Ray was about to start
        main(tiny_args(tiny_bert, tmp_path, "fits", "ray.num_cpus=2", "ray.client_cpus=2"))


# ----------------------------------------------------------------------------- cohort_size above the users


def test_a_cohort_larger_than_the_users_is_refused_before_ray_starts(tiny_bert, tmp_path, capsys, monkeypatch):
    """Before: clamped to the 6 users without a word."""
    refuse_ray(monkeypatch)
    assert main(tiny_args(tiny_bert, tmp_path, "c", "federation.cohort_size=7")) == 2
    err = one_line_error(capsys)
    assert "federation.cohort_size=7 is more than the 6 users who train" in err and "at most 6" in err, err
    assert "federation.cohort_fraction=1.0" in err and not (tmp_path / "c").exists()


def test_new_users_count_against_the_cohort_on_every_path(tiny_bert, tmp_path, monkeypatch):
    """6 users, 2 held out as new users: 4 train, so a cohort of 5 is refused (also by
    prepare_run, the start of `flwr run .` and of the in-process grid), one of 4 is not."""
    refuse_ray(monkeypatch)
    args = tiny_args(tiny_bert, tmp_path, "n", "data.new_users=count:2", "federation.cohort_size=5")
    with pytest.raises(ConfigError, match="cohort_size=5 is more than the 4 users who train"):
        prepare_run(config_from_args(args))
    assert not (tmp_path / "n").exists()
    with pytest.raises(RayStarted):
        main(tiny_args(tiny_bert, tmp_path, "n4", "data.new_users=count:2", "federation.cohort_size=4"))


# ----------------------------------------------------------------------------- a model folder without weights


def test_a_model_folder_without_weights_is_refused_before_ray_starts(tiny_bert, tmp_path, capsys, monkeypatch):
    """Before: check_model passed (config.json and tokenizer are there), and transformers'
    OSError came as a traceback once Ray had started."""
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").unlink()
    refuse_ray(monkeypatch)
    assert main(tiny_args(folder, tmp_path, "w")) == 2
    err = one_line_error(capsys)
    assert f"Model folder '{folder}' has no PyTorch weights (none of model.safetensors, pytorch_model.bin" in err, err
    assert "save_pretrained" in err and "hf download" in err and not (tmp_path / "w").exists()


def test_sharded_weights_missing_a_shard_are_refused(tiny_bert, tmp_path):
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_bert, folder)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    weight_map = {"bert.embeddings.word_embeddings.weight": "model-00001-of-00002.safetensors",
                  "classifier.weight": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"1 of the 2 weight shards model.safetensors.index.json names are missing "
                                          r"\(e.g. model-00002-of-00002.safetensors\)"):
        check_model(model_config(folder))
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"")
    check_model(model_config(folder))  # every shard there: the check passes (transformers reads them)


# ----------------------------------------------------------------------------- benchmark texts and the cache folder


def peft_u_args(tiny_bert: Path, tmp_path: Path, name: str, path: Path, cache: str) -> list[str]:
    return tiny_args(tiny_bert, tmp_path, name, "--benchmark", "peft-u/tweeteval", f"data.path={path}",
                     f"data.cache_dir={cache}", "data.split=leaked")


def test_a_lone_surrogate_in_a_text_is_one_line_naming_file_user_and_text(tiny_bert, tmp_path, capsys, monkeypatch):
    """Valid JSON ("\\ud800" is a legal escape), but not a character: before, UnicodeEncodeError's
    traceback from writing the processed-data cache."""
    bad = user_json("u2", GOOD).replace('"tweet 1"', '"tweet \\ud800 one"')
    path = write_prepared(tmp_path, [user_json("u1", GOOD), bad, user_json("u3", GOOD)])
    assert "\\ud800" in path.read_text() and json.loads(path.read_text())["u2"]["train"]["u2-1"]["text"] == "tweet \ud800 one"
    refuse_ray(monkeypatch)
    assert main(peft_u_args(tiny_bert, tmp_path, "s", path, str(tmp_path / "cache"))) == 2
    err = one_line_error(capsys)
    assert f"{path}: user 'u2', train / 'u2-1'" in err and "the text 'tweet \\ud800 one' holds a lone surrogate \\ud800" in err, err
    assert "Replace the \\ud800 escape in the source file" in err and not (tmp_path / "s").exists()


def unwritable_folder() -> Path:
    """A folder that refuses new entries even to root (sysfs' /sys/kernel), or a skip."""
    folder = Path("/sys/kernel")
    try:
        (folder / "fedpeft-probe").mkdir()
    except OSError:
        if folder.is_dir():
            return folder
        pytest.skip("no sysfs here, so no folder that refuses writes even to root")
    (folder / "fedpeft-probe").rmdir()
    pytest.skip("no sysfs here, so no folder that refuses writes even to root")


@pytest.mark.parametrize("cache", ["existing", "to_create"])
def test_a_cache_folder_that_cannot_be_written_is_one_line(cache, tiny_bert, tmp_path, capsys, monkeypatch):
    """Before: PermissionError's traceback (from the cache's lock file's mkdir)."""
    root = unwritable_folder() / ("" if cache == "existing" else "fedpeft-cache")
    path = write_prepared(tmp_path, [user_json(f"u{i}", GOOD) for i in range(3)])
    refuse_ray(monkeypatch)
    assert main(peft_u_args(tiny_bert, tmp_path, "ro", path, str(root))) == 2
    err = one_line_error(capsys)
    assert f"The processed-data cache folder {root} (data.cache_dir" in err and "cannot be written" in err, err
    assert "Set data.cache_dir to a folder you can write" in err and not (tmp_path / "ro").exists()
