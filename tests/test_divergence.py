"""Diverged training is a failure, not a score (issue 18, item 2).

A call whose loss or trained weights become non-finite fails for its user with the reason
"training diverged (...)"; nothing of it is stored, so the user keeps the adapter of its last good
round; the summary counts the divergences. Non-finite values are refused for every float key, and
the run folder's JSON files never hold a bare NaN.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from fedpeft.cli import config_from_args
from fedpeft.config import Config, ConfigError
from fedpeft.config_checks import iter_fields
from fedpeft.config_load import build_config
from fedpeft.data import get_benchmark
from fedpeft.federation import client_calls
from fedpeft.federation.checkpoint import Checkpoint, final_adapter
from fedpeft.federation.reporting import summary_table
from fedpeft.federation.selection import read_rounds
from fedpeft.files import json_text, json_value
from fedpeft.learning.models import compose_user_model, get_model
from fedpeft.learning.training import TrainingDiverged, train_user
from tests.inprocess_grid import run_in_process

FLOAT_KEYS = [key for key, kind, *_ in iter_fields() if kind is float]


def _no_nan_token(token: str):
    raise AssertionError(f"bare {token} in a JSON file")


def strict_json(text: str):
    return json.loads(text, parse_constant=_no_nan_token)


def tiny_config(tiny_bert, tmp_path: Path, strategy: str = "local_only", rounds: int = 1, name: str = "") -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds = strategy, rounds
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 3, 8, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 3, 4, 0.05
    cfg.strategy.fedrep_head_epochs = 1
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), name or strategy, False
    return cfg


def per_user(run: Path) -> dict[str, dict[str, str]]:
    with (run / "per_user.csv").open() as f:
        return {row["user_id"]: row for row in csv.DictReader(f)}


# ---- train_user ------------------------------------------------------------------------------

@pytest.fixture
def one_user(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path)
    bench = get_benchmark(cfg)
    loaded = get_model(cfg, len(bench.task().labels))
    compose_user_model(loaded, {}, None)  # the process's cached model: start from the common init
    return loaded, bench.load_user(0).train, bench.task(), cfg


def test_train_user_raises_at_the_first_non_finite_loss(one_user):
    loaded, examples, task, cfg = one_user
    with pytest.raises(TrainingDiverged, match=r"^training diverged \(non-finite loss at step 2\).*Lower train\.lr") as err:
        train_user(loaded, examples, task, cfg, seed=0, lr=1e30)
    assert "1e+30" in str(err.value)  # the learning rate the call used
    assert isinstance(err.value, RuntimeError)


def test_train_user_raises_on_non_finite_weights_after_the_last_step(one_user):
    """One step at lr=inf: its loss (before the step) is finite, the weights it leaves are not."""
    loaded, examples, task, cfg = one_user
    cfg.train.steps = 1
    with pytest.raises(TrainingDiverged, match=r"^training diverged \(non-finite weights after step 1\)"):
        train_user(loaded, examples, task, cfg, seed=0, lr=math.inf)


def test_train_user_at_a_sane_rate_is_unchanged(one_user):
    loaded, examples, task, cfg = one_user
    result = train_user(loaded, examples, task, cfg, seed=0)
    assert math.isfinite(result["train_loss"]) and result["steps"] == 3


# ---- config ----------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_key_refuses_non_finite_values(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' got '{value}', which is not a finite number.*`{key}=0.01`"):
        build_config(overrides=[(key, value)])


def test_non_finite_values_from_a_yaml_file_are_refused(tmp_path):
    for text, key in (("train:\n  lr: .inf\n", "train.lr"), ("train:\n  lr: .nan\n", "train.lr"),
                      ("federation:\n  proximal_mu: -.inf\n", "federation.proximal_mu"),
                      ("federation:\n  proximal_mu: inf\n", "federation.proximal_mu")):
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"'{key}' got .*not a finite number"):
            build_config([str(path)])


@pytest.mark.parametrize("args", [["train.lr=inf"], ["--train.lr", "nan"], ["federation.proximal_mu=inf"]])
def test_the_command_line_refuses_non_finite_values(args):
    """The entry point's parser (``python -m fedpeft.sim`` exits 2 with its message, before Ray)."""
    with pytest.raises(ConfigError, match=rf"'{args[0].strip('-').split('=')[0]}' got .*not a finite number"):
        config_from_args(args)


# ---- JSON ------------------------------------------------------------------------------------

def test_json_text_writes_null_and_json_value_reads_nan():
    import numpy as np

    record = {"round": 1, "train_loss": float("nan"), "x": [math.inf, 1.5, np.float32(-np.inf)], "n": np.int64(3)}
    text = json_text(record)
    assert strict_json(text) == {"round": 1, "train_loss": None, "x": [None, 1.5, None], "n": 3.0}
    back = json_value(text)
    assert math.isnan(back["train_loss"]) and math.isnan(back["x"][0]) and back["x"][1] == 1.5


# ---- a run -----------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["local_only", "fedrep", "feddpa"])  # fedrep and feddpa train twice a call
def test_a_diverging_run_fails_its_users_and_says_so(strategy, tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, strategy, rounds=2)
    cfg.train.lr = 1e30
    results, run = run_in_process(cfg)
    users = get_benchmark(cfg).user_ids()

    failures = strict_json((run / "failures.json").read_text())
    train_failures = [f for f in failures if f["call"] == "train"]
    assert len(train_failures) == 2 * len(users)  # every user, every round
    for f in train_failures:
        assert f["error"].startswith("fedpeft.learning.training.TrainingDiverged: training diverged (non-finite loss at step "), f
    assert results["diverged"] == {"calls": 2 * len(users), "users": len(users)}
    # a run in which no user ever trained is no result (issue 28): every user diverged and was undertrained
    assert results["status"] == "failed" and results["summary"]["n_failed"] == 0
    assert results["status_counts"] == {"users": len(users), "failed": 0, "diverged": len(users),
                                        "undertrained": len(users), "affected": len(users), "max_failed_fraction": 0.1}

    rows = per_user(run)
    for user in users:  # scored on the common init: the adapter no call could train
        assert rows[user]["rounds_trained"] == "0" and rows[user]["failed_calls"] == "2", rows[user]
    assert Checkpoint.load(run).progress["last_round"] == [0] * len(users)
    assert not list((run / "adapters").glob("*.safetensors"))  # nothing of a diverged call was stored

    for name in ("metrics.jsonl", "rounds_per_user.jsonl", "predictions.jsonl"):
        for line in (run / name).read_text().splitlines():
            strict_json(line)
    assert strict_json((run / "metrics.jsonl").read_text().splitlines()[0])["train_loss"] is None  # no call trained
    strict_json((run / "results.json").read_text())
    assert read_rounds(run)  # the readers take the files as they are now

    text = summary_table(results)
    assert f"{len(users)} user(s) diverged in training ({2 * len(users)} call(s)" in text and "lower train.lr" in text


def test_a_user_that_diverges_keeps_the_adapter_of_its_last_good_round(tiny_bert, tmp_path, monkeypatch):
    """Round 1 trains at a sane rate, round 2 at 1e30: each user's final adapter is its round-1 one,
    the same as a run that stopped after round 1 gives."""
    good = tiny_config(tiny_bert, tmp_path, rounds=1, name="one-round")
    _, reference = run_in_process(good)

    real_round_lr = client_calls.round_lr
    monkeypatch.setattr(client_calls, "round_lr", lambda config, r, total: 1e30 if r == 2 else real_round_lr(config, r, 1))
    results, run = run_in_process(tiny_config(tiny_bert, tmp_path, rounds=2, name="diverges"))
    users = get_benchmark(good).user_ids()

    assert results["diverged"] == {"calls": len(users), "users": len(users)}
    assert results["status"] == "failed" and results["status_counts"]["affected"] == len(users)  # round 2: every user
    assert Checkpoint.load(run).progress["last_round"] == [1] * len(users)
    for user in users:
        kept, expected = final_adapter(run, user), final_adapter(reference, user)
        assert kept is not None and kept.keys() == expected.keys()
        for key, value in expected.items():
            assert torch.isfinite(kept[key]).all()
            torch.testing.assert_close(kept[key], value, rtol=0, atol=0)
    assert {p.name.rsplit(".", 2)[-2] for p in (run / "adapters").glob("*.safetensors")} == {"r1"}
    rounds = [strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["trained"] for r in rounds] == [len(users), 0] and rounds[1]["train_loss"] is None
