"""A study starts Ray once (fedpeft.launch.ray_start.SharedRay): its runs share one Ray session
and one pool of warm client actors, and each run's results are byte for byte those of the same
run on its own (a Ray of its own, fresh actors). Real Ray, real Flower simulation engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedpeft.sim import main as sim_main
from tests.conftest import tiny_args

pytestmark = pytest.mark.slow

FILES = ("per_user.csv", "predictions.jsonl", "rounds_per_user.jsonl")


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def test_a_studys_runs_share_ray_and_warm_actors_and_match_separate_runs(tiny_bert, tmp_path, monkeypatch, capfd):
    """Before: every run of a study started Ray, its actors and their imports and models again."""
    import ray

    from fedpeft.launch import ray_start
    from fedpeft.study.compare import main as compare_main

    starts: list[int] = []
    start_ray = ray_start.start_ray

    def counted(*args, **kwargs):
        starts.append(1)
        return start_ray(*args, **kwargs)

    monkeypatch.setattr(ray_start, "start_ray", counted)
    args = tiny_args(tiny_bert, tmp_path, "unused")
    del args[2:6]  # without --out and --name: the study names its runs
    assert args[:2] == ["--model", str(tiny_bert)] and "--name" not in args
    assert compare_main(["--strategies", "local_only,fedavg", "--baseline", "local_only",
                         "--compare-out", str(tmp_path / "study"), *args]) == 0
    assert len(starts) == 1, "the study started Ray more than once"
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith("fedpeft: starting")]
    assert len(printed) == 2 and "warm" not in printed[0] and printed[1].endswith("the study's workers are warm"), printed
    assert not ray.is_initialized(), "the study left Ray running"
    first, second = (results(tmp_path / "study" / name) for name in ("local_only", "fedavg"))
    # the second run's calls ran on the first run's worker processes, whose backbone was built once
    assert first["workers"] and set(second["workers"]) == set(first["workers"])
    assert second["workers"] == first["workers"], (first["workers"], second["workers"])

    # the same fedavg run on its own: a Ray of its own, fresh actors; the same files, byte for byte
    assert sim_main(tiny_args(tiny_bert, tmp_path, "alone", "--strategy", "fedavg")) == 0
    first = capfd.readouterr().out.splitlines()[0]  # before anything else: what runs and where its folder is
    assert first.startswith("fedpeft: starting fedavg on synthetic (6 users, 2 rounds); run folder "
                            f"{tmp_path / 'alone'}; start-up: "), first
    assert len(starts) == 2 and not ray.is_initialized()
    alone = results(tmp_path / "alone")
    assert not set(alone["workers"]) & set(second["workers"])  # other processes
    for name in FILES:
        assert (tmp_path / "alone" / name).read_bytes() == (tmp_path / "study" / "fedavg" / name).read_bytes(), name
    def rounds(run: Path) -> list[dict]:  # each round's record but its wall time
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in (run / "metrics.jsonl").open()]

    assert rounds(tmp_path / "alone") == rounds(tmp_path / "study" / "fedavg")
    timing = {"wall_seconds", "wall_time", "seconds"}
    assert {k: v for k, v in alone["summary"].items() if k not in timing} == {
        k: v for k, v in second["summary"].items() if k not in timing}
