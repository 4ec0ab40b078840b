"""The Python API (fedpeft.api): fedpeft.run equals the command line, load_run gives the same Run,
compare runs and loads a comparison, the plots plot every point, and the example notebook runs.

Runs go through the in-process grid (tests/inprocess_grid.py) in place of Ray: ``fedpeft.sim.run``
is swapped for it, so the command line (``fedpeft.sim.main``) and the API run the same code. Every
table is checked against the run folder's files read with csv and json, sharing no code with the API.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import fedpeft
import fedpeft.sim
from fedpeft.config import Config, ConfigError
from tests.study_in_process import run as run_in_process

REPO = Path(__file__).resolve().parents[1]
TINY = {"data.num_users": 4, "data.train_per_user": 8, "data.test_per_user": 8, "train.steps": 3,
        "train.batch_size": 4, "output.progress": False}


def cli_arguments(overrides: dict[str, object]) -> list[str]:
    return [f"{k}={v}" for k, v in overrides.items()]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scored(path: Path) -> dict[str, float]:
    """Each scored user's accuracy, from a per_user.csv."""
    return {row["user_id"]: float(row["accuracy"]) for row in read_csv(path) if row["status"] == "ok"}


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """fedavg run once by the command line and once by fedpeft.run with the same settings, and
    local_only (1 round) by fedpeft.run; all on the in-process grid."""
    out = tmp_path_factory.mktemp("api-runs")
    settings = {**TINY, "model": str(tiny_bert), "output.dir": str(out)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fedpeft.sim, "run", run_in_process)
        code = fedpeft.sim.main(["--strategy", "fedavg", "--rounds", "2", "--name", "cli", *cli_arguments(settings)])
        assert code == 0
        api = fedpeft.run(strategy="fedavg", rounds=2, overrides={**settings, "output.name": "api"})
        local = fedpeft.run(strategy="local_only", rounds=1, overrides={**settings, "output.name": "local"})
    return {"cli": out / "cli", "api": api, "local": local}


def test_run_gives_what_the_command_line_writes(runs):
    api, cli = runs["api"], runs["cli"]
    assert api.run_dir == (cli.parent / "api").resolve()
    assert (api.run_dir / "per_user.csv").read_bytes() == (cli / "per_user.csv").read_bytes()
    rows = read_csv(cli / "per_user.csv")
    assert api.per_user["user_id"].tolist() == [r["user_id"] for r in rows]
    assert api.per_user["status"].tolist() == [r["status"] for r in rows] == ["ok"] * 4
    for metric in ("accuracy", "macro_f1"):
        assert api.per_user[metric].tolist() == [float(r[metric]) for r in rows]
    assert api.per_user["n_test"].tolist() == [int(r["n_test"]) for r in rows]
    assert api.per_user["error"].tolist() == [r["error"] for r in rows] == [""] * 4
    cli_results = json.loads((cli / "results.json").read_text())
    assert api.summary == cli_results["summary"]
    assert (api.status, api.status_reason) == (cli_results["status"], cli_results["status_reason"]) \
        and api.status == "ok"
    assert api.privacy == {"mechanism": "none", "epsilon": math.inf}  # shared without DP: unbounded (null in the file)
    assert cli_results["privacy"] == {"mechanism": "none", "epsilon": None}
    assert runs["local"].privacy == {"mechanism": "none", "epsilon": 0.0}  # shares nothing
    # the per-round tables, against the files read line by line
    lines = read_jsonl(api.run_dir / "metrics.jsonl")
    assert api.rounds["round"].tolist() == [r["round"] for r in lines] == [1, 2]
    assert api.rounds["accuracy"].tolist() == [r["accuracy"] for r in lines]
    assert api.rounds["train_loss"].tolist() == [r["train_loss"] for r in read_jsonl(cli / "metrics.jsonl")]
    user_lines = read_jsonl(api.run_dir / "rounds_per_user.jsonl")
    assert len(api.rounds_per_user) == len(user_lines) == 8  # 4 users x 2 rounds
    assert api.rounds_per_user["test_accuracy"].tolist() == [r["test"]["accuracy"] for r in user_lines]
    assert api.rounds_per_user["val_macro_f1"].tolist() == [r["val"]["macro_f1"] for r in user_lines]
    assert api.failures.empty and "user_id" in api.failures.columns


def test_load_run_gives_the_same_run_for_a_moved_folder(runs, tmp_path):
    api = runs["api"]
    moved = tmp_path / "elsewhere" / "api"
    shutil.copytree(api.run_dir, moved)
    loaded = fedpeft.load_run(moved)
    assert loaded.run_dir == moved.resolve()
    for table in ("per_user", "rounds", "rounds_per_user", "failures"):
        pd.testing.assert_frame_equal(getattr(loaded, table), getattr(api, table))
    assert loaded.summary == api.summary and loaded.privacy == api.privacy and loaded.status == api.status
    assert "fedpeft_version" in (moved / "config.yaml").read_text()  # what Config.from_dict refuses
    assert loaded.config.federation.strategy == "fedavg" and loaded.config.federation.rounds == 2
    assert loaded.config.output.store_dir == str(moved.resolve() / "adapters")  # the copy's own store


def test_load_run_refuses_a_folder_without_results(runs, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs["api"].run_dir, unfinished)
    (unfinished / "results.json").unlink()
    with pytest.raises(ConfigError, match=r"no finished run .*--resume"):
        fedpeft.load_run(unfinished)
    with pytest.raises(ConfigError, match="not a fedpeft run folder"):
        fedpeft.load_run(tmp_path)


@pytest.mark.parametrize("api_args, argv", [
    ({"overrides": {"train.lrr": 0.1}}, ["train.lrr=0.1"]),
    ({"overrides": {"train.lr": -1}}, ["train.lr=-1"]),
    ({"strategy": "fedavgg"}, ["--strategy", "fedavgg"]),
    ({"rounds": 2.5}, ["--rounds", "2.5"]),
])
def test_a_bad_setting_raises_the_error_the_command_line_prints(api_args, argv, capsys):
    assert fedpeft.sim.main(argv) == 2
    printed = capsys.readouterr().err
    with pytest.raises(ConfigError) as refused:
        fedpeft.run(**api_args)
    assert f"fedpeft: error: {refused.value}\n" == printed


def test_a_config_or_a_yaml_file_is_the_base_as_on_the_command_line(tmp_path):
    from fedpeft.api import build, settings
    from fedpeft.cli import config_from_args

    yaml_file = tmp_path / "mine.yaml"
    yaml_file.write_text("train:\n  lr: 0.02\nfederation:\n  rounds: 3\n")
    pairs = settings(strategy="fedsa", overrides={"train.lr": 1e-3, "compare.seeds": [0, 1]})
    expected = config_from_args(["--config", str(yaml_file), "--strategy", "fedsa", "train.lr=0.001", "compare.seeds=0,1"])
    assert build(yaml_file, pairs).to_dict() == expected.to_dict()
    base = Config()
    base.data.num_users = 7
    built = build(base, pairs)
    assert (built.data.num_users, built.train.lr, built.federation.strategy, built.compare.seeds) == (7, 1e-3, "fedsa", [0, 1])
    assert base.train.lr == Config().train.lr  # the Config given is left as it was


def test_plots_plot_every_round_and_every_common_user(runs):
    api, local = runs["api"], runs["local"]
    lines = read_jsonl(api.run_dir / "metrics.jsonl")
    fig = api.plot_rounds()
    curves = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    for label, key in (("test accuracy", "accuracy"), ("validation accuracy", "val_accuracy"), ("training loss", "train_loss")):
        assert list(curves[label].get_xdata()) == [r["round"] for r in lines if key in r] == [1, 2]
        assert list(curves[label].get_ydata()) == [r[key] for r in lines if key in r]
    ours, theirs = scored(api.run_dir / "per_user.csv"), scored(local.run_dir / "per_user.csv")
    fig = api.plot_users(local)
    points = fig.axes[0].collections[0].get_offsets().tolist()
    users = [u for u in ours if u in theirs]
    assert len(points) == len(users) == 4
    assert points == [[theirs[u], ours[u]] for u in users]  # x: the other run, y: this one
    better = sum(ours[u] > theirs[u] for u in users)
    assert f": {better} better, {sum(ours[u] < theirs[u] for u in users)} worse" in fig.axes[0].get_title()


def test_compare_runs_a_comparison_then_loads_it(tiny_bert, tmp_path, monkeypatch):
    calls: list[str] = []

    def counting(config, resume=False):
        calls.append(config.federation.strategy)
        return run_in_process(config, resume)

    monkeypatch.setattr(fedpeft.sim, "run", counting)
    settings = {**TINY, "model": str(tiny_bert), "rounds": 1, "data.num_users": 3}
    table = fedpeft.compare(["local_only", "fedavg"], overrides=settings, out=tmp_path / "study")
    assert calls == ["local_only", "fedavg"]
    rows = read_csv(tmp_path / "study" / "comparison.csv")
    assert table["strategy"].tolist() == [r["strategy"] for r in rows] == ["local_only", "fedavg", "majority"]
    assert table["accuracy_best_val"].tolist() == [float(r["accuracy_best_val"]) for r in rows]
    assert table["accuracy_final"].tolist()[:2] == [
        sum(scored(tmp_path / "study" / name / "per_user.csv").values()) / 3 for name in ("local_only", "fedavg")]
    assert table.attrs["study_dir"] == str((tmp_path / "study").resolve())
    again = fedpeft.compare(["local_only", "fedavg"], overrides=settings, out=tmp_path / "study")
    assert calls == ["local_only", "fedavg"]  # loaded: nothing ran again
    pd.testing.assert_frame_equal(again, table)
    with pytest.raises(ConfigError, match=r"train\.lr"):  # a different study in its folder: refused, naming the key
        fedpeft.compare(["local_only", "fedavg"], overrides={**settings, "train.lr": 0.5}, out=tmp_path / "study")


def test_importing_fedpeft_stays_cheap():
    code = ("import sys, fedpeft; heavy = {'torch', 'ray', 'flwr', 'pandas', 'matplotlib', 'transformers'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_package_names_the_api():
    """fedpeft.compare is the API's function (the comparison module lives in fedpeft.study)."""
    import fedpeft.api
    import fedpeft.study.compare

    assert fedpeft.compare is fedpeft.api.compare and fedpeft.run is fedpeft.api.run
    assert fedpeft.load_run is fedpeft.api.load_run and callable(fedpeft.study.compare.compare)


def test_the_example_notebook_runs(tmp_path, monkeypatch):
    import nbclient  # the dev extra's: a notebook that cannot run is a failure, not a skip
    import nbformat

    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    # the runs on the in-process grid, as everywhere in this file (the notebook's own cells unchanged)
    notebook.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
        "import fedpeft.sim\nfrom tests.study_in_process import run\nfedpeft.sim.run = run"))
    monkeypatch.setenv("FEDPEFT_EXAMPLE_QUICK", "1")
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # plot_rounds and plot_users
    assert any("(True, 'ok')" in o.get("data", {}).get("text/plain", "") for o in outputs)  # load_run: equal tables
    assert len(list((tmp_path / "runs").glob("compare-*/fedavg/per_user.csv"))) == 1
