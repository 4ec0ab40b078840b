"""A real two-node Ray cluster on this machine (`ray start --head` + `ray start --address`)."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


@contextlib.contextmanager
def cluster(blind_to: Path | None = None) -> Iterator[str]:
    """A head and a worker node, one CPU each. ``blind_to``: the worker node runs in its own mount
    namespace with an empty tmpfs over that folder, as a node that does not mount a shared file
    system would see it."""
    temp_dir = Path("/tmp") / f"fedpeft-ray-{os.getpid()}"  # short: Ray's socket paths have a length limit
    port = _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [ray_bin, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
            f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    worker = [ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"]
    if blind_to is not None:
        worker = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  f"mount -t tmpfs tmpfs {shlex.quote(str(blind_to))} && exec {shlex.join(worker)}"]
    try:
        subprocess.run(head, check=True, env=env, capture_output=True, timeout=120)
        subprocess.run(worker, check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}"
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        _kill_cluster(temp_dir)


@pytest.fixture
def two_node_cluster():
    with cluster() as address:
        yield address


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


def test_a_node_that_does_not_see_the_store_stops_the_run_before_training(tiny_bert, tmp_path, capsys):
    """The worker node's view of the output folder is empty (no shared file system): its workers'
    first calls say so, and the run stops before any user trains."""
    out = tmp_path / "out"
    out.mkdir()
    with cluster(blind_to=out) as address:
        code = main(tiny_args(tiny_bert, out, "blind", f"ray.address={address}", "ray.num_cpus=0", "data.num_users=12"))
    err = capsys.readouterr().err
    assert code == 1
    assert "failed their first call, before any training" in err and "does not see this run's adapter store" in err
    assert "on a file system every Ray node mounts" in err
    assert not list((out / "blind" / "adapters").glob("*.safetensors"))  # nobody trained


def test_a_client_larger_than_every_node_is_refused_before_the_simulation(tiny_bert, tmp_path):
    """Issue 29: before, Flower logged "ActorPool is empty" tracebacks and the run waited forever
    (hence a subprocess with a timeout). Each node has 1 CPU and no GPU."""
    with cluster() as address:
        for name, setting, fix in (("cpus", "ray.client_cpus=2", "ray.client_cpus=1 or less"),
                                   ("gpus", "ray.client_gpus=1", "ray.client_gpus=0 (clients on the CPU)")):
            args = tiny_args(tiny_bert, tmp_path, name, f"ray.address={address}", "ray.num_cpus=0", setting)
            done = subprocess.run([sys.executable, "-m", "fedpeft.sim", *args], cwd=Path(__file__).resolve().parents[1],
                                  capture_output=True, text=True, timeout=240)
            err = done.stderr.strip()
            assert done.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, err
            assert f"the Ray cluster at ray.address={address} has no such node (1 CPU, 0 GPUs; 1 CPU, 0 GPUs)" in err, err
            assert fix in err and not (tmp_path / name).exists(), err
