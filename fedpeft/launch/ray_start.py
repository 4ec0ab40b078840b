"""Ray for fedpeft's simulations: the cluster address checked before anything starts, the
backend config Flower's Ray backend gets, and Ray started in a thread of its own while the driver
prepares the run (:class:`RayStart`)."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import warnings
from pathlib import Path
from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.launch.signals import take_signals
from fedpeft.learning.models import WARM_MODEL_ENV

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")


WORKER_SETUP_HOOK = "fedpeft.federation.client_app.warm_up"


def check_ray_address(address: str) -> None:
    """Fail fast when no Ray cluster answers (Flower would hang instead)."""
    if not address:
        return
    target = address
    if address == "auto":
        target = os.environ.get("RAY_ADDRESS", "")
        if not target and RAY_CURRENT_CLUSTER.is_file():
            target = RAY_CURRENT_CLUSTER.read_text().strip()
        if not target:
            raise ConfigError("ray.address='auto' but no Ray cluster is running on this machine. "
                              "Start one with `ray start --head`, or leave ray.address empty to start a local Ray.")
    hostport = target.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=3):
            pass
    except (OSError, ValueError):
        raise ConfigError(f"No Ray cluster answers at ray.address='{address}' ({hostport}). Start the head with "
                          "`ray start --head --port=PORT` and give HOST:PORT, or leave ray.address empty for a local Ray.") from None


def backend_config(config: Config) -> dict[str, Any]:
    init_args: dict[str, Any] = {"include_dashboard": False}
    if config.ray.address:
        init_args["address"] = config.ray.address
    elif config.ray.num_cpus:
        init_args["num_cpus"] = config.ray.num_cpus
    # max_restarts: Flower's Ray backend puts an actor that died mid-call back into its pool, and
    # every later call on it would fail at once; restarted, it takes calls again (the call that was
    # running when it died fails, and is reported as that user's failure for the round)
    resources = {"num_cpus": config.ray.client_cpus, "num_gpus": config.ray.client_gpus, "max_restarts": -1}
    return {"client_resources": resources, "init_args": init_args}


def start_ray(config: Config, warm_model: str | None = None) -> None:
    """Start Ray the way Flower's Ray backend does (``RayBackend.init_ray``, which would otherwise
    run inside the simulation: the backend's ``init_args``, and the driver's ``sys.path`` as the
    workers' ``PYTHONPATH``), so that fedpeft's signal handlers can be put back after it; and with
    :data:`WORKER_SETUP_HOOK`, so that each worker imports the model libraries as it starts and
    builds ``warm_model`` (:func:`fedpeft.learning.models.warm_model_spec`) when one is given."""
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    env_vars = {"PYTHONPATH": pythonpath, **({WARM_MODEL_ENV: warm_model} if warm_model else {})}
    # Ray's note on a future default (GPU visibility with num_gpus=0) is not the user's news: stderr
    # stays for fedpeft's own lines (a failed run's one line)
    warnings.filterwarnings("ignore", message="Tip: In future versions of Ray", category=FutureWarning)
    ray.init(runtime_env={"env_vars": env_vars, "worker_process_setup_hook": WORKER_SETUP_HOOK},
             **backend_config(config)["init_args"])
    take_signals()


class _Without(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class RayStart:
    """Ray starting in a thread of its own while the driver prepares the run (its imports and
    model build take about as long as Ray's start, and neither needs the other). :meth:`wait`
    waits for it (and makes the signal handlers fedpeft's again); :meth:`stop` waits for it and
    shuts Ray down, for a run that fails before it starts: then no Ray process is left and the
    user sees only the error; :meth:`close` ends the thread once Ray is shut down.

    The thread lives until then: Ray's local processes get Linux's parent-death signal, which
    fires when the *thread* that started them ends, not the process."""

    def __init__(self, config: Config, warm_model: str | None = None) -> None:
        self.error: BaseException | None = None
        self.started, self.released = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._start, args=(config, warm_model), name="fedpeft-ray-start", daemon=True)
        self.thread.start()

    def _start(self, config: Config, warm_model: str | None) -> None:
        ray_log = logging.getLogger("ray._private.worker")
        # fedpeft's own handlers are put back by wait(); and a run refused while Ray starts was never started
        quiet = _Without(("SIGTERM handler is not set", "Started a local Ray instance", "Connecting to existing Ray cluster",
                           "Connected to Ray cluster"))
        ray_log.addFilter(quiet)
        try:
            start_ray(config, warm_model)  # take_signals() does nothing outside the main thread: wait() does it
        except BaseException as err:  # noqa: BLE001 - handed to the main thread by wait()
            self.error = err
        finally:
            ray_log.removeFilter(quiet)
            self.started.set()
        self.released.wait()  # Ray's processes would die with this thread

    def wait(self) -> None:
        self.started.wait()
        take_signals()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        import ray

        self.started.wait()
        take_signals()
        if ray.is_initialized():
            ray.shutdown()
        self.close()

    def close(self) -> None:
        self.released.set()
        self.thread.join()


class SharedRay:
    """One Ray session, and one pool of warm client actors, for all the runs of a study (a
    comparison, a privacy or where-sharing-pays study): ``with SharedRay(): ...`` around the runs.

    Without it every run pays the whole start-up again: Ray's daemons, then each worker process
    importing torch, transformers, peft and Flower and building its backbone. Inside it, the
    first run that starts a local Ray hands it over (:meth:`keep`) instead of shutting it down,
    and Flower's Ray backend (``RayBackend``, which Flower's simulation looks up by name on every
    run) is replaced by one whose actor pool outlives the run: the next run with the same client
    resources gets the same actors, whose imports and model cache (keyed by everything a model
    depends on, :func:`fedpeft.learning.models.get_model`) are warm. A pool with an actor still
    busy when its run ends (a call past ``federation.call_timeout``) is not reused: its actors go.
    Results do not change: a call composes the user's model from the run's own state
    (tests/test_shared_ray.py)."""

    current: SharedRay | None = None

    def __init__(self) -> None:
        self.start: RayStart | None = None
        self.pools: dict[str, Any] = {}
        self._flower: Any = None

    def __enter__(self) -> SharedRay:
        from flwr.server.superlink.fleet.vce.backend import raybackend

        if SharedRay.current is not None:  # a study inside a study: the outer one owns Ray
            return self
        SharedRay.current = self
        self._flower = raybackend.RayBackend
        raybackend.RayBackend = _shared_backend(self, self._flower)
        return self

    def __exit__(self, *exc: object) -> None:
        if SharedRay.current is not self:
            return
        from flwr.server.superlink.fleet.vce.backend import raybackend

        raybackend.RayBackend = self._flower
        SharedRay.current = None
        for pool in self.pools.values():
            pool.terminate_all_actors()
        self.pools.clear()
        if self.start is not None:
            self.start.stop()  # Ray shut down, and the thread that started it ends
            self.start = None

    def keep(self, start: RayStart) -> None:
        """Take over the local Ray a run started: the session shuts it down, not the run. (A Ray
        shut down by someone else in between takes its actors with it: their pools go.)"""
        if self.start is not None:
            self.start.stop()
        self.pools.clear()
        self.start = start


def _shared_backend(session: SharedRay, flower_backend: type) -> type:
    """Flower's ``RayBackend``, with its actor pool kept in ``session`` between runs and Ray left
    running when a run ends."""

    class SharedRayBackend(flower_backend):  # type: ignore[misc, valid-type]
        def build(self, app_fn: Any) -> None:
            self.pool_key = json.dumps([self.client_resources, self.actor_kwargs], sort_keys=True, default=str)
            pool = session.pools.pop(self.pool_key, None)
            if pool is None:
                super().build(app_fn)
                return
            self.pool, self.app_fn = pool, app_fn

        def terminate(self) -> None:
            pool = self.pool
            if pool is None:
                return
            if not pool._future_to_actor and len(pool.pool) == pool.num_actors:  # every actor idle: kept warm
                session.pools[self.pool_key] = pool
                return
            import ray

            pool.terminate_all_actors()
            for actor in pool._future_to_actor.values():  # still running a call nobody waits for
                ray.kill(actor)

    return SharedRayBackend
