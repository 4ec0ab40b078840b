"""where_sharing_pays.py and privacy.py resume as compare.py does (issue 29): with nothing but the
study folder, what is finished is kept, what is missing runs, and the study's tables come out as
before. Their runs are written by hand (tests/test_compare.py's write_run) in place of
fedpeft.sim.run; the pre-compute checks see the tiny model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import fedpeft.sim
from tests.test_compare import write_run
from tests.test_compare_checks import script_main
from tests.test_where_sharing_pays import k_runner

USERS = {"u1": 4, "u2": 4, "u3": 4}


def privacy_run(cfg) -> dict:
    name, dp = cfg.federation.strategy, cfg.privacy.mechanism != "none"
    privacy = ({"mechanism": "central", "epsilon": 3.99, "delta": 1e-5, "population_size": 3, "noise_multiplier": 1.5}
               if dp else {"mechanism": "none", "epsilon": 0.0 if name == "local_only" else None})
    lift = {"local_only": 0.0, "fedavg": 0.1}[name] - (0.05 if dp else 0.0)
    return write_run(Path(cfg.output.dir) / cfg.output.name, name, {u: {1: (.5, .5 + lift), 2: (.5, .6 + lift)} for u in USERS},
                     USERS, privacy=privacy)


def recording(monkeypatch: pytest.MonkeyPatch, study: Path, write) -> list[tuple[str, bool]]:
    """fedpeft.sim.run replaced by ``write`` (a hand-written run folder); returns (folder, resume) per call."""
    calls: list[tuple[str, bool]] = []

    def run(cfg, resume=False):
        calls.append((os.path.relpath(Path(cfg.output.dir) / cfg.output.name, study), resume))
        return write(cfg)

    monkeypatch.setattr(fedpeft.sim, "run", run)
    return calls


def test_a_privacy_study_resumes_what_is_missing_and_keeps_its_budgets(tiny_bert, tmp_path, monkeypatch, capsys):
    """Before: --resume was refused (an option of python -m fedpeft.sim only)."""
    study = tmp_path / "study"
    calls = recording(monkeypatch, study, privacy_run)
    main = script_main("privacy")
    argv = ["--strategies", "fedavg", "--epsilons", "4,inf", "--mechanism", "central", "--seeds", "0", "--model",
            str(tiny_bert), "data.num_users=3", "--compare-out", str(study)]
    assert main(argv) == 0
    assert calls == [("epsinf/local_only", False), ("epsinf/fedavg", False), ("eps4/fedavg", False)]
    before = (study / "privacy.csv").read_bytes()
    (study / "eps4" / "local_only").unlink()  # as if stopped before eps4 began
    shutil.rmtree(study / "eps4" / "fedavg")
    calls.clear()
    assert main(["--resume", str(study)]) == 0
    assert calls == [("eps4/fedavg", False)]  # local_only is kept, and linked again
    assert (study / "eps4" / "local_only").is_symlink() and (study / "privacy.csv").read_bytes() == before
    capsys.readouterr()
    assert main(["--resume", str(study), "--epsilons", "2"]) == 2
    err = capsys.readouterr().err
    assert "--epsilons ('4.0,inf' -> '2.0')" in err and len(err.strip().splitlines()) == 1


def test_where_sharing_pays_resumes_what_is_missing(tiny_bert, tmp_path, monkeypatch):
    study = tmp_path / "study"
    calls = recording(monkeypatch, study, k_runner())
    main = script_main("where_sharing_pays")
    argv = ["--strategies", "fedavg", "--seeds", "0,1", "--ks", "4,all", "--model", str(tiny_bert), "data.num_users=8",
            "--compare-out", str(study)]
    assert main(argv) == 0
    assert len(calls) == 8
    before = (study / "where_sharing_pays.csv").read_bytes()
    shutil.rmtree(study / "Kall" / "fedavg-seed1")
    calls.clear()
    assert main(["--resume", str(study)]) == 0
    assert calls == [("Kall/fedavg-seed1", False)]
    assert (study / "where_sharing_pays.csv").read_bytes() == before
