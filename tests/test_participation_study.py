"""sims/participation.py end to end on the tiny model (in-process runs): one comparison per
availability and per deadline, the deadlines as quantiles of the users' round times computed here
from the documented rule, the table read back from each comparison, the bins and the plots."""

from __future__ import annotations

import csv
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config import ConfigError
from tests.conftest import load_sim, tiny_args
from tests.inprocess_grid import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    return load_sim("participation")


def test_the_participation_study_on_real_runs(tiny_bert, tmp_path):
    study = load_study()
    args = [a for a in tiny_args(tiny_bert, tmp_path, "unused") if a not in ("--name", "unused")]
    parsed = study.parse_args(["--strategies", "local_only,fedavg", "--availabilities", "const:1;beta:2,2",
                               "--deadlines", "none,median", "--speed", "lognormal:1", "--deadline-strategies", "fedavg",
                               "--compare-out", str(tmp_path / "study"), *args])
    names, out, config, availabilities, deadlines, modes, speed, deadline_names = parsed
    assert modes == ["drop", "partial"]
    assert availabilities == ["const:1", "beta:2,2"] and deadline_names == ["local_only", "fedavg"]
    folder = study.study(names, deadline_names, config, availabilities, deadlines, modes, speed, out,
                         runner=lambda cfg: run_in_process(cfg)[0])
    with (folder / "participation.csv").open() as f:
        rows = {(r["condition"], r["strategy"]): r for r in csv.DictReader(f)}
    assert {c for c, _ in rows} == {"avail-0", "avail-1", "deadline-none", "deadline-median-drop", "deadline-median-partial"}
    # the median deadline: the median over the 6 users of 8 examples / speed (tiny_args: 2 steps of 4 examples)
    seconds = [8 / math.exp(np.random.default_rng([0, 73, zlib.crc32(f"user{i:04d}".encode())]).normal(0, 1)) for i in range(6)]
    assert float(rows[("deadline-median-drop", "fedavg")]["deadline"]) == pytest.approx(float(np.median(seconds)))
    assert float(rows[("deadline-median-drop", "fedavg")]["sim_time"]) == pytest.approx(2 * float(np.median(seconds)))  # 2 rounds
    assert rows[("deadline-median-partial", "fedavg")]["stragglers"] == "partial"
    assert float(rows[("deadline-none", "fedavg")]["sim_time"]) == pytest.approx(2 * max(seconds))
    for (condition, strategy), row in rows.items():  # each headline is its comparison's, read back
        with (folder / condition / "comparison.csv").open() as f:
            comparison = {r["strategy"]: r for r in csv.DictReader(f)}
        key = f"accuracy_{config.compare.select}"
        assert float(row[key]) == pytest.approx(float(comparison[strategy][key]))
    assert float(rows[("avail-1", "fedavg")]["mean_availability"]) < 1 == float(rows[("avail-0", "fedavg")]["mean_availability"])
    with (folder / "participation_by_availability.csv").open() as f:
        bins = list(csv.DictReader(f))
    assert {b["condition"] for b in bins} == {"avail-0", "avail-1"} and {b["strategy"] for b in bins} == {"fedavg"}
    assert sum(int(b["users"]) for b in bins if b["condition"] == "avail-1") == 6
    assert (folder / "availability.png").stat().st_size > 0 and (folder / "sim_time.png").stat().st_size > 0
    assert "| deadline-median-partial |" in (folder / "participation.md").read_text()
    with pytest.raises(ConfigError, match="set by this study"):
        study.parse_args(["--strategies", "fedavg", "federation.deadline=3", *args])
    with pytest.raises(ConfigError, match="not a form fedpeft knows"):
        study.parse_args(["--availabilities", "sometimes", *args])
