"""Entry point: ``python -m fedpeft.sim --strategy local_only`` runs one simulation.

Checks everything it can before Ray starts (config, model, cluster address), then runs the
ServerApp and ClientApp through Flower's simulation engine on Ray and prints a summary.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import threading
import traceback
import uuid
import warnings
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedpeft.checkpoint import (
    RUN_FILE,
    Checkpoint,
    RunIdentity,
    check_resume_folder,
    claim_run_dir,
    release_run_dir,
)
from fedpeft.cli import DEBUG_FLAG, sim_args
from fedpeft.config import Config, ConfigError
from fedpeft.data import get_benchmark
from fedpeft.files import json_value
from fedpeft.models import (
    WARM_MODEL_ENV,
    adapter_state,
    build_model,
    check_model,
    fit_size_knob,
    warm_model_spec,
)
from fedpeft.preflight import check_cohort, check_connected_ray, check_local_ray
from fedpeft.reporting import summary_table
from fedpeft.run_checks import check_fits
from fedpeft.run_folder import own_store
from fedpeft.selection import check_selection
from fedpeft.store import check_store_is_free, check_store_writable, claim_store
from fedpeft.strategies import make_strategy
from fedpeft.verdict import FAILED_RUN_EXIT, failed_run_line
from fedpeft.wandb_preflight import check_wandb_online

RAY_CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
WORKER_SETUP_HOOK = "fedpeft.client_app.warm_up"


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


def run_dir_path(config: Config) -> Path:
    strategy = re.sub(r"[^\w.-]+", "_", config.federation.strategy)  # a plug-in's module:Class
    name = config.output.name or f"{strategy}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    return (Path(config.output.dir) / name).resolve()


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


def prepare_adapter(config: Config) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Build the adapter once in the driver: check the strategy fits it, take the initial shared
    part, and count parameters (what each user trains, shares and keeps private)."""
    strategy = make_strategy(config)
    bench = get_benchmark(config)
    num_labels = len(bench.task().labels)
    if config.peft.target_params:
        knob, value, count = fit_size_knob(config, num_labels)
        print(f"peft.target_params={config.peft.target_params}: peft.{knob}={value} gives {count:,} trainable parameters")
    loaded = build_model(config, num_labels, strategy.extra_adapters)
    # strategy x method x backbone x packing x privacy (also what a study checks for all its runs first)
    keys, held_out = check_fits(config, strategy, bench, loaded)
    stats = strategy.pretrain(loaded, lambda: [bench.load_user(i) for i in range(len(bench.user_ids())) if i not in held_out],
                              bench.task())
    if stats is not None:
        print(f"{strategy.name}: trained centrally in the driver before the simulation: {stats}")
    state = adapter_state(loaded)
    phases = [p.name for p in strategy.phases()]
    shared = strategy.shared_keys(keys)
    trainable = [k for k in keys if not all(strategy.is_frozen(k, p) for p in phases)]
    # private: trained in some phase that does not send it (a frozen key is never private)
    private = [k for k in keys if any(not strategy.is_frozen(k, p) and not strategy.is_shared(k, p) for p in phases)]

    def numel(subset: list[str]) -> int:
        return int(sum(state[k].numel() for k in subset))

    new_user = strategy.new_user_keys(keys)  # what a new user trains on top of the final shared part
    accounting = {"adapter_params": numel(keys), "trainable_params_per_user": numel(trainable),
                  "shared_params": numel(shared), "private_params": numel(private), "new_user_params": numel(new_user),
                  # the final shared part alone is a new user's whole model (fedavg): scored before its fine-tune too
                  "new_users_as_is": int(set(new_user) <= set(shared)),
                  "pretrain_examples": int(stats["examples"]) if stats else 0}
    return {k: state[k] for k in shared}, accounting


class RunFailed(RuntimeError):
    """The simulation stopped before it finished; the message says why."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM reached the driver; raised in its main thread, where Flower's
    simulation runtime runs (the ServerApp runs in a thread of its own). ``run_dir``: the run
    folder, once the run has one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Path | None = None

    @property
    def exit_code(self) -> int:  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        return 128 + self.signum

    def message(self) -> str:
        if self.run_dir is None or not (self.run_dir / RUN_FILE).is_file():
            return "fedpeft: interrupted before the run started; nothing to continue"
        done = Checkpoint.saved_round(self.run_dir)
        return f"fedpeft: interrupted after round {done}; continue with `python -m fedpeft.sim --resume {self.run_dir}`"


SIGNALS = (signal.SIGINT, signal.SIGTERM)
_taking_signals = False  # inside stop_on_signals(): fedpeft's handlers are wanted


def _first_signal(signum: int, frame: Any) -> None:
    from fedpeft.server_app import STOPPING

    STOPPING.set()
    for sig in SIGNALS:
        signal.signal(sig, _second_signal)
    # what Flower's threads say from now on is about the actors the shutdown ends: not the user's news
    logging.getLogger("flwr").disabled = True
    raise Interrupted(signum)


def _second_signal(signum: int, frame: Any) -> None:  # while the run shuts down: end at once
    os._exit(128 + signum)


def take_signals() -> None:
    """Make SIGINT and SIGTERM fedpeft's (again: ``ray.init`` replaces the SIGTERM handler with
    one that aborts the driver) while :func:`stop_on_signals` runs, in the main thread only."""
    if _taking_signals and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _first_signal)


@contextlib.contextmanager
def stop_on_signals():
    """While the block runs, the first SIGINT or SIGTERM raises :class:`Interrupted` in the main
    thread and tells the ServerApp's thread to checkpoint nothing more
    (:data:`fedpeft.server_app.STOPPING`); a second one, while the run shuts down, ends the
    process at once."""
    global _taking_signals
    from fedpeft.server_app import STOPPING

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    STOPPING.clear()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _taking_signals = True
    take_signals()
    try:
        yield
    finally:
        _taking_signals = False
        logging.getLogger("flwr").disabled = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_ray(config: Config, warm_model: str | None = None) -> None:
    """Start Ray the way Flower's Ray backend does (``RayBackend.init_ray``, which would otherwise
    run inside the simulation: the backend's ``init_args``, and the driver's ``sys.path`` as the
    workers' ``PYTHONPATH``), so that fedpeft's signal handlers can be put back after it; and with
    :data:`WORKER_SETUP_HOOK`, so that each worker imports the model libraries as it starts and
    builds ``warm_model`` (:func:`fedpeft.models.warm_model_spec`) when one is given."""
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


@dataclass
class PreparedRun:
    """What the simulation starts from: the run folder, the initial shared part, the parameter
    accounting, the run's identity and, when resuming, the checkpoint to continue from."""

    run_dir: Path
    initial_shared: dict[str, torch.Tensor]
    accounting: dict[str, int]
    identity: RunIdentity
    resume: Checkpoint | None = None


@dataclass
class ClaimedRun:
    """The quick first part of a run's preparation (:func:`claim_run`): the run folder, claimed
    for this process, and what the checks of the folder and the adapter store found."""

    run_dir: Path
    created: bool  # this process made the folder: it goes again if the preparation fails
    store_dir: Path
    identity: RunIdentity
    resume: Checkpoint | None


def claim_run(config: Config, resume: bool = False) -> ClaimedRun:
    """Check the model and the selection, claim the run folder for this process
    (:func:`fedpeft.checkpoint.claim_run_dir`; given up again if anything here fails), and check
    the adapter store, which a fresh run must find free and a resumed run must own."""
    check_model(config)
    check_selection(config)
    check_cohort(config)
    run_dir = run_dir_path(config)
    created = claim_run_dir(run_dir, exist_ok=bool(config.output.name) or resume)
    try:
        store_dir = Path(config.output.store_dir or run_dir / "adapters").resolve()
        if resume:
            identity = check_resume_folder(run_dir)
            identity = own_store(run_dir, store_dir, identity)
            checkpoint = Checkpoint.load(run_dir)
        else:
            check_store_is_free(store_dir)
            identity, checkpoint = RunIdentity.new(), None
        check_store_writable(store_dir)
    except BaseException:
        release_run_dir(run_dir, remove_folder=created)
        raise
    return ClaimedRun(run_dir, created, store_dir, identity, checkpoint)


def finish_preparation(config: Config, claimed: ClaimedRun) -> PreparedRun:
    """The slow second part: the adapter (initial shared part and parameter accounting: the
    driver builds the model), then the run's identity and the adapter store's claim. Sets
    ``output.store_dir``. Gives up the run folder's claim if anything here fails."""
    try:
        initial_shared, accounting = prepare_adapter(config)
        config.output.store_dir = str(claimed.store_dir)
        if claimed.resume is None or claimed.identity.copied_from:
            claimed.identity.write(claimed.run_dir)
        claim_store(claimed.store_dir, claimed.run_dir, claimed.identity.run_id, get_benchmark(config).driver_files())
    except BaseException:
        release_run_dir(claimed.run_dir, remove_folder=claimed.created)
        raise
    return PreparedRun(claimed.run_dir, initial_shared, accounting, claimed.identity, claimed.resume)


def prepare_run(config: Config, resume: bool = False) -> PreparedRun:
    """Everything before the simulation starts (:func:`claim_run`, then
    :func:`finish_preparation`). The caller gives up the run folder's claim when the run ends
    (:func:`release_run_dir`)."""
    return finish_preparation(config, claim_run(config, resume))


class Preparation:
    """:func:`finish_preparation` in a thread of its own, started at once: the driver builds its
    model while Ray starts and while the simulation's workers start and import theirs (Ray's
    ``worker_process_setup_hook``, :data:`WORKER_SETUP_HOOK`), instead of before them.
    :meth:`result` waits for it (the ServerApp's first step); a failure is raised there."""

    def __init__(self, config: Config, claimed: ClaimedRun) -> None:
        self.future: Future[PreparedRun] = Future()
        threading.Thread(target=self._prepare, args=(config, claimed), name="fedpeft-prepare", daemon=True).start()

    def _prepare(self, config: Config, claimed: ClaimedRun) -> None:
        try:
            self.future.set_result(finish_preparation(config, claimed))
        except BaseException as err:  # noqa: BLE001 - raised in the thread that asks for the result
            self.future.set_exception(err)

    def failed(self) -> bool:
        """Whether it has already ended with a failure (a refusal found while Ray started)."""
        return self.future.done() and self.future.exception() is not None

    def result(self) -> PreparedRun:
        return self.future.result()


def finished_results(config: Config) -> dict[str, Any] | None:
    """The results of the run folder ``config`` names when that run is complete (every round
    checkpointed and its results.json written), else None."""
    run_dir = run_dir_path(config)
    rounds = sum(p.rounds for p in make_strategy(config).phases())
    if not (run_dir / "results.json").is_file() or Checkpoint.saved_round(run_dir) < rounds:
        return None
    try:
        return json_value((run_dir / "results.json").read_text())
    except (OSError, ValueError):  # unreadable: finish the run again
        return None


def run(config: Config, resume: bool = False) -> dict[str, Any]:
    """Run one simulation for a validated config (``resume``: continue the run folder the config
    names from its last completed round; a complete one is left as it is, and its results are
    returned); returns the results written to results.json."""
    import ray

    if resume and (done := finished_results(config)) is not None:
        print(f"fedpeft: {run_dir_path(config)} is complete (all {done['rounds']} rounds, and its results.json); "
              "nothing was run or changed. Its summary:")
        return done
    check_ray_address(config.ray.address)
    check_wandb_online(config)
    check_model(config)  # the backbone and its tokenizer, before Ray starts (claim_run checks it again)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the data first (read here, the preparation's thread finds it cached): the workers' model needs its labels
    bench = get_benchmark(config)
    num_users = len(bench.user_ids())
    check_cohort(config)  # before Ray starts (claim_run checks it again)
    started_ray = not ray.is_initialized()
    if started_ray and not config.ray.address:  # one client must fit the local Ray about to start
        check_local_ray(config)
    warm_model = warm_model_spec(config, len(bench.task().labels), make_strategy(config).extra_adapters)
    ray_start = RayStart(config, warm_model) if started_ray else None  # overlaps the preparation
    try:
        if ray_start is None or config.ray.address:  # a Ray that exists: one client must fit a node, before the run folder
            if ray_start is not None:
                ray_start.wait()
            check_connected_ray(config)
        claimed = claim_run(config, resume)
    except BaseException:  # refused (or interrupted) before the simulation: Ray goes again, nothing is left
        if ray_start is not None:
            ray_start.stop()
        raise
    preparing = Preparation(config, claimed)
    from flwr.simulation import run_simulation  # imported while Ray starts: it is not needed before

    from fedpeft.client_app import app as client_app
    from fedpeft.server_app import make_server_app, simulated_nodes
    logging.getLogger("flwr").setLevel(logging.ERROR)
    results: dict[str, Any] = {}
    interrupted = False
    try:
        if ray_start is not None:
            ray_start.wait()
            check_connected_ray(config)  # the local Ray as it started (checked before it started)
        if preparing.failed():  # refused while Ray started: no simulation
            preparing.result()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server_app = make_server_app(config, preparing.result, results)
            run_simulation(server_app=server_app, client_app=client_app,
                           num_supernodes=simulated_nodes(config, num_users), backend_config=backend_config(config))
    except Exception:
        if not {"_error", "_refused"} & set(results):
            raise
    except Interrupted as stop:
        interrupted = True
        stop.run_dir = claimed.run_dir
        raise
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
        if ray_start is not None:
            ray_start.close()
        if not interrupted:  # the preparation's thread gives up the claim itself if it fails; wait for it
            wait_for([preparing.future])
        release_run_dir(claimed.run_dir)
    if "_refused" in results:  # the preparation failed: its own error, as when it fails before Ray starts
        raise results["_refused"]
    if "_error" in results:
        raise RunFailed(f"{results['_error']} (run folder {claimed.run_dir})") from results["_error"]
    if not results:
        raise RunFailed(f"The simulation ended without results; see the log above and {claimed.run_dir}. "
                           f"Continue it with `python -m fedpeft.sim --resume {claimed.run_dir}`.")
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        with stop_on_signals():
            config, resume = sim_args(args)
            results = run(config, resume)
    except Interrupted as stop:  # Ray is shut down: say where the run stands, and end without waiting for Flower's thread
        print(stop.message(), file=sys.stderr)
        finish_wandb(stop.exit_code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.exit_code)
    except (ConfigError, RunFailed) as err:
        if DEBUG_FLAG in args:  # the traceback of what went wrong, with the error it came from
            traceback.print_exception(err)
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    print(summary_table(results))
    if results.get("status") == "failed":  # everything is written; one line says why and what to try
        sys.stdout.flush()
        print(failed_run_line(results), file=sys.stderr)
        return FAILED_RUN_EXIT
    if results["summary"]["n_evaluated"] == 0:
        print("fedpeft: error: every user failed; the reasons are in failures.json", file=sys.stderr)
        return 1
    return 0


def finish_wandb(exit_code: int) -> None:
    """Close this process's W&B run, if one is open, as ended by a signal."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):
            wandb.run.finish(exit_code=exit_code)


def exit_process(code: int) -> None:
    """End ``python -m fedpeft.sim`` with ``code`` as ``sys.exit`` would (the atexit handlers
    run: W&B's, logging's; the standard streams are flushed), but without Python tearing down
    every module of torch, transformers, Ray and Flower one by one (about a second on 2 cores).
    While a thread that is not a daemon still runs, a plain ``sys.exit``, which waits for it."""
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
