"""The run's start-up (issue 20): Ray starts, and its workers import the model libraries, while
the driver prepares the run (fedpeft.launch.ray_start.RayStart, fedpeft.launch.prepare.Preparation and Ray's
worker_process_setup_hook); a run the preparation refuses, before or after the simulation has
started, ends with the error alone and leaves nothing behind."""

from __future__ import annotations

import os
import threading
import time

import pytest

from fedpeft.config import Config
from tests.conftest import tiny_args

pytestmark = pytest.mark.slow

REFUSAL = "fedpeft: error: train.pack_users=2: strategy feddpa does not pack"


def _assert_refused_alone(code: int, capfd: pytest.CaptureFixture[str], run_dir) -> None:
    import ray

    assert code == 2
    out, err = capfd.readouterr()
    assert REFUSAL in err
    assert "Ray" not in out + err and "SIGTERM" not in out + err and "Traceback" not in out + err, out + err
    assert not ray.is_initialized()
    assert not run_dir.exists()  # its run folder was given up


def test_a_run_refused_while_ray_starts_leaves_nothing_running(tiny_bert, tmp_path, capfd):
    """The preparation refuses (packing with a strategy that cannot pack) before Ray is up: the
    simulation never starts, Ray is shut down again, and the user sees the error alone."""
    from fedpeft.sim import main

    code = main(tiny_args(tiny_bert, tmp_path, "refused", "--strategy", "feddpa", "train.pack_users=2"))
    _assert_refused_alone(code, capfd, tmp_path / "refused")


def test_a_refusal_that_comes_after_the_simulation_started_reads_the_same(tiny_bert, tmp_path, capfd, monkeypatch):
    """The preparation runs beside the simulation's start (its workers start and import): when
    its refusal comes only after the ServerApp is waiting for it, the run ends the same way."""
    import ray

    import fedpeft.federation.server_app
    import fedpeft.launch.prepare
    from fedpeft.sim import main

    prepare_adapter, make_server_app = fedpeft.launch.prepare.prepare_adapter, fedpeft.federation.server_app.make_server_app
    simulation_started = threading.Event()

    def late_prepare_adapter(config: Config):
        assert simulation_started.wait(120), "the simulation did not start while the run was being prepared"
        time.sleep(1.0)  # the ServerApp's thread is waiting for the preparation by now
        return prepare_adapter(config)

    def spied_make_server_app(*args, **kwargs):
        assert ray.is_initialized()
        simulation_started.set()
        return make_server_app(*args, **kwargs)

    monkeypatch.setattr(fedpeft.launch.prepare, "prepare_adapter", late_prepare_adapter)
    monkeypatch.setattr(fedpeft.federation.server_app, "make_server_app", spied_make_server_app)
    code = main(tiny_args(tiny_bert, tmp_path, "late", "--strategy", "feddpa", "train.pack_users=2"))
    assert simulation_started.is_set()
    _assert_refused_alone(code, capfd, tmp_path / "late")


def test_ray_workers_import_the_libraries_and_build_the_model_as_they_start(tiny_bert, tmp_path, monkeypatch):
    """Ray's worker_process_setup_hook: a worker process has imported the ClientApp's module,
    transformers' model code and peft, and has built the run's model into its cache (the very
    cache entry its first call looks up), before it runs anything: here a task that imports
    none of them. So this happens while the driver prepares, not after."""
    import ray

    from fedpeft.cli import config_from_args
    from fedpeft.launch.ray_start import start_ray
    from fedpeft.learning import models

    @ray.remote(num_cpus=1)
    def worker_state() -> dict:
        import sys

        from fedpeft.learning import models as worker_models

        return {"imported": [m for m in ("fedpeft.federation.client_app", "peft", "transformers.modeling_utils") if m in sys.modules],
                "cached": list(worker_models._CACHE), "builds": worker_models.BACKBONE_LOADS}

    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # start_ray sets it, as Flower does
    config = config_from_args(tiny_args(tiny_bert, tmp_path, "hook", "--strategy", "oppu"))  # oppu: an extra adapter
    extra = ("personal",)
    assert models.warm_model_spec(config, 3, extra) is not None
    start_ray(config, models.warm_model_spec(config, 3, extra))
    try:
        state = ray.get(worker_state.remote(), timeout=120)
    finally:
        ray.shutdown()
    assert state == {"imported": ["fedpeft.federation.client_app", "peft", "transformers.modeling_utils"],
                     "cached": [models._cache_key(config, 3, extra)], "builds": 1}


def test_no_model_is_built_where_the_worker_cannot_know_it(tiny_bert, tmp_path):
    """GPU workers get their device after the process starts, and peft.target_params is sized by
    the driver first: their workers import the libraries only."""
    from fedpeft.cli import config_from_args
    from fedpeft.learning import models

    def spec(*extra: str) -> str | None:
        return models.warm_model_spec(config_from_args(tiny_args(tiny_bert, tmp_path, "spec", *extra)), 3, ())

    assert spec() is not None
    assert spec("ray.client_gpus=1") is None and spec("peft.target_params=5000") is None
