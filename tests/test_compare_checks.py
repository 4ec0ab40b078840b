"""A study checks every run before any compute, and refuses a study folder that is a file (issue 29).

The studies' runs go to the in-process grid (fedpeft.sim.run replaced); none may be called.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_sim
from tests.test_compare_resume import in_process, study_args

ROOT = Path(__file__).resolve().parents[1]


def script_main(name: str):
    """The main of sims/<name>.py (compare's is fedpeft.study.compare's)."""
    if name == "compare":
        from fedpeft.study.compare import main

        return main
    return load_sim(name).main


def test_a_comparison_with_a_strategy_that_does_not_fit_is_refused_before_any_run(tiny_bert, tmp_path, monkeypatch, capsys):
    """Before: local_only and fedavg of seed 0 ran (and wrote their folders) before fedsa was refused."""
    calls = in_process(monkeypatch)
    out = tmp_path / "study"
    argv = study_args(tiny_bert, out, "--peft", "ia3")
    argv[argv.index("--strategies") + 1] = "fedavg,fedsa"
    assert script_main("compare")(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert calls == [] and not out.exists()
    assert err[0].startswith("fedpeft: error: 1 problem(s) found in the study's 6 runs before any started; nothing was run")
    assert len(err) == 2 and err[1].startswith("  - fedsa-seed0, fedsa-seed1: Strategy 'fedsa' does not fit this adapter")


def test_a_privacy_study_lists_every_misfit_before_any_run(tiny_bert, tmp_path, monkeypatch, capsys):
    """Before: the budget inf's runs and eps4's fedavg ran before fedavg_ft was refused with DP."""
    calls = in_process(monkeypatch)
    out = tmp_path / "study"
    argv = study_args(tiny_bert, out, "--epsilons", "inf,4", "train.pack_users=2")
    argv[argv.index("--strategies") + 1] = "fedavg,fedavg_ft,oppu"
    assert script_main("privacy")(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert calls == [] and not out.exists()
    assert err[0].startswith("fedpeft: error: 2 problem(s) found in the study's 16 runs")
    assert err[1].startswith("  - epsinf/oppu-seed0, epsinf/oppu-seed1, eps4/oppu-seed0, eps4/oppu-seed1: "
                             "train.pack_users=2: strategy oppu does not pack")
    assert err[2].startswith("  - eps4/fedavg_ft-seed0, eps4/fedavg_ft-seed1: Config key 'privacy.mechanism' got 'central' "
                             "with federation.strategy=fedavg_ft")
    assert len(err) == 3


@pytest.mark.parametrize("script", ["compare", "where_sharing_pays", "privacy"])
def test_a_study_folder_that_is_a_file_is_one_line(script, tiny_bert, tmp_path, monkeypatch, capsys):
    """Before: FileExistsError's traceback."""
    calls = in_process(monkeypatch)
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    assert script_main(script)(study_args(tiny_bert, path)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"fedpeft: error: --compare-out {path} is a file, not a folder. Give a folder for the study "
                   "(a new or an empty one).")
    assert path.read_text() == "mine" and calls == []
