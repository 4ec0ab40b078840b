"""A run folder written by fedpeft before its modules moved into subpackages (the pinned commit
below, the last flat layout) resumes and exports with today's code.

The old code runs from its own source tree, taken from this repository's history with
``git archive``, in a subprocess: it starts a fedsa run on the in-process grid (the real
ClientApp) and is "killed" in round 3, as tests/test_resume.py does. Today's code resumes that
folder; its results equal an uninterrupted run of today's code, and a user's adapter exports to
a folder that peft's own loader reads back."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

from fedpeft.federation.checkpoint import Checkpoint, resume_config
from tests.inprocess_grid import run_in_process
from tests.test_resume import assert_same_results, config
from tests.test_simulation import assert_export_predicts_what_the_run_predicted

REPO = Path(__file__).resolve().parents[1]
FLAT_LAYOUT = "1e376d3"  # main just before the move to fedpeft/{data,learning,federation,launch,study}

OLD_RUN = """
import sys
from pathlib import Path
from tests.inprocess_grid import run_in_process
from tests.test_resume import DriverKilled, KilledInRound3, config
import fedpeft.server_app  # the flat layout
try:
    run_in_process(config(Path(sys.argv[1]), Path(sys.argv[2]), "old", "fedsa", "best_val_per_user"), grid_class=KilledInRound3)
except DriverKilled:
    print("killed in round 3")
"""


def old_tree(tmp_path: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", FLAT_LAYOUT, "fedpeft", "strategies", "tests"],
                             cwd=REPO, capture_output=True, check=False)
    assert archive.returncode == 0, f"commit {FLAT_LAYOUT} is not in this clone's history: {archive.stderr.decode()}"
    tree = tmp_path / "old-tree"
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(tree, filter="data")
    (tree / "fedpeft" / "strategies").symlink_to("../strategies")  # installed as fedpeft.strategies
    return tree


def test_a_run_folder_of_the_flat_layout_resumes_and_exports(tiny_bert, tmp_path):
    tree = old_tree(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tree), "WANDB_MODE": "disabled"}
    old = subprocess.run([sys.executable, "-c", OLD_RUN, str(tiny_bert), str(tmp_path)], cwd=tree, env=env,
                         capture_output=True, text=True, timeout=600)
    assert old.returncode == 0 and "killed in round 3" in old.stdout, old.stderr[-3000:]
    folder = tmp_path / "old"
    assert Checkpoint.load(folder).round == 2 and not (folder / "results.json").exists()

    results, run = run_in_process(resume_config(folder, [], [("output.progress", "false")]), resume=True)
    assert run == folder and results["rounds"] == 4 and results["status"] == "ok"
    run_in_process(config(tiny_bert, tmp_path, "whole", "fedsa", "best_val_per_user"))
    assert_same_results(folder, tmp_path / "whole")

    # export with today's code: peft's own loader reads it, and it predicts what the run predicted
    assert_export_predicts_what_the_run_predicted(folder, "user0001", tmp_path / "adapter")
