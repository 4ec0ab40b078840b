"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpeft.sim import main
from tests.conftest import tiny_args

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: Path) -> None:
    """Stop only the Ray processes of this cluster (their command lines name its temp dir)."""
    ray_bin = Path(sys.executable).with_name("ray")
    mine = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().decode(errors="ignore")
            except OSError:
                continue
            if str(temp_dir) in cmdline and int(proc.name) != os.getpid():
                mine.append(int(proc.name))
    for pid in mine:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(2)
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert ray_bin.exists()


@pytest.fixture
def two_node_cluster(tmp_path_factory):
    temp_dir = Path("/tmp") / f"fedpeft-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    port = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    worker = [ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"]
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=120)
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _kill_cluster(temp_dir)


def test_simulation_runs_on_a_two_node_cluster(two_node_cluster, tiny_bert, tmp_path):
    import ray

    assert main(tiny_args(tiny_bert, tmp_path, "cluster", f"ray.address={two_node_cluster}", "ray.num_cpus=0",
                          "--strategy", "fedsa")) == 0
    assert not ray.is_initialized()  # fedpeft disconnected from the cluster, which keeps running
    results = json.loads((tmp_path / "cluster" / "results.json").read_text())
    assert results["summary"]["n_evaluated"] == 6 and results["summary"]["n_failed"] == 0
    assert len(results["workers"]) == 2  # one client actor on each node's single CPU
    assert all(loads == 1 for loads in results["workers"].values())
    ray.init(address=two_node_cluster)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    finally:
        ray.shutdown()
