"""fedpeft as a Flower app: ``flwr run .`` and ``python -m fedpeft.sim`` share one code path.

The end-to-end test runs the real Flower path: a local SuperLink in simulation mode (the command
``flwr run`` itself starts for its ``local`` connection, here on free ports and a private
FLWR_HOME), ``flwr run <repo> --stream`` against it, runtime dependency installation off."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli

from fedpeft.config import ConfigError
from fedpeft.config_load import build_config
from fedpeft.flower_app import run_config_defaults
from fedpeft.launch.assemble import config_from_run_config
from fedpeft.sim import main

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pyproject_run_config() -> dict:
    from flwr.common.config import flatten_dict

    return flatten_dict(tomli.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])


def test_run_config_is_the_schema_with_its_defaults():
    assert pyproject_run_config() == run_config_defaults()
    assert config_from_run_config(pyproject_run_config()).to_dict() == build_config().to_dict()


def test_run_config_values_are_checked_like_the_command_line():
    config = config_from_run_config({**run_config_defaults(), "federation.strategy": "fedsa", "train.lr": 0.001,
                                     "peft.target_modules": "query,value"})
    assert (config.federation.strategy, config.train.lr, config.peft.target_modules) == ("fedsa", 0.001, ["query", "value"])
    with pytest.raises(ConfigError, match="Unknown strategy 'fedfoo'.*local_only"):
        config_from_run_config({"federation.strategy": "fedfoo"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"flower-superlink did not listen on {port}: {log.read_text()[-2000:]}")


RUN = {"federation.rounds": "2", "data.num_users": "3", "data.train_per_user": "8", "data.val_per_user": "2",
       "data.test_per_user": "6", "train.steps": "2", "train.batch_size": "4", "output.progress": "false",
       "federation.strategy": "fedsa"}


@pytest.mark.slow
def test_flwr_run_and_fedpeft_sim_give_identical_per_user_results(tiny_bert, tmp_path, ray_shutdown):
    out = tmp_path / "runs"
    assert main(["--model", str(tiny_bert), "--out", str(out), "--name", "sim", "ray.num_cpus=2",
                 *[f"{k}={v}" for k, v in RUN.items()]]) == 0
    import ray

    ray.shutdown()

    home, http_port, control_port = tmp_path / "flwr-home", _free_port(), _free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{http_port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = tmp_path / "superlink.log"
    superlink = subprocess.Popen(  # what `flwr run` starts for its `local` connection
        [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--control-api-address", f"127.0.0.1:{control_port}", "--host", "127.0.0.1", "--port", str(http_port),
         "--database", str(tmp_path / "state.db"), "--log-file", str(log)],
        env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(http_port, superlink, log)
        run_config = " ".join([f"model.name='{tiny_bert}'", f"output.dir='{out}'", "output.name='flwr'",
                               *[f"{k}={v}" if v.replace(".", "").isdigit() or v in ("true", "false") else f"{k}='{v}'"
                                 for k, v in RUN.items()]])
        flwr = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "--stream", "--run-config", run_config,
                               "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        superlink.terminate()
        superlink.wait(timeout=30)
    assert (out / "flwr" / "per_user.csv").is_file(), flwr.stdout[-3000:] + flwr.stderr[-3000:]
    assert (out / "flwr" / "per_user.csv").read_text() == (out / "sim" / "per_user.csv").read_text()
    assert re.search(r"\nusers evaluated +3\n", flwr.stdout), flwr.stdout[-3000:]  # the summary table
    installed = list((home / "apps").iterdir())  # the FAB carries no second copy of fedpeft's code
    assert len(installed) == 1 and not list(installed[0].rglob("*.py"))


def test_a_failed_run_fails_the_serverapp_so_flower_records_it_failed(tiny_bert, tmp_path):
    """Before: under `flwr run` a run that never trained (every call diverged) ended as a success."""
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.federation.server_app import simulated_nodes
    from fedpeft.flower_app import FailedRun
    from fedpeft.flower_app import main as server_main
    from tests.inprocess_grid import InProcessGrid

    run_config = {**run_config_defaults(), **RUN, "model.name": str(tiny_bert), "output.dir": str(tmp_path),
                  "output.name": "diverged", "train.lr": 1e30, "federation.rounds": 1}
    config = config_from_run_config(run_config)
    grid = InProcessGrid(simulated_nodes(config, config.data.num_users))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # the ServerApp's, as Flower sets them
    with pytest.raises(FailedRun, match="the run failed: .*diverged"):
        server_main(grid, Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=run_config))
    results = json.loads((tmp_path / "diverged" / "results.json").read_text())
    assert results["status"] == "failed"  # everything was written before the ServerApp failed
