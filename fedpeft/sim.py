"""Entry point: ``python -m fedpeft.sim --strategy local_only`` runs one simulation.

Checks everything it can before Ray starts (config, model, cluster address), then runs the
ServerApp and ClientApp through Flower's simulation engine on Ray and prints a summary.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import traceback
import warnings
from concurrent.futures import wait as wait_for
from pathlib import Path
from typing import Any

from fedpeft.cli import DEBUG_FLAG, sim_args
from fedpeft.config import Config, ConfigError
from fedpeft.data import get_benchmark
from fedpeft.federation.checkpoint import release_run_dir
from fedpeft.federation.reporting import summary_table
from fedpeft.federation.verdict import FAILED_RUN_EXIT, failed_run_line
from fedpeft.launch.preflight import (
    check_cohort,
    check_connected_ray,
    check_local_ray,
    check_participation,
)
from fedpeft.launch.prepare import Preparation, claim_run, finished_results, run_dir_path
from fedpeft.launch.ray_start import RayStart, SharedRay, backend_config, check_ray_address
from fedpeft.launch.run_checks import check_backbone_kind
from fedpeft.launch.signals import Interrupted, finish_wandb, stop_on_signals
from fedpeft.launch.wandb_preflight import check_wandb_online
from fedpeft.learning.model_files import check_model
from fedpeft.learning.models import warm_model_spec
from fedpeft.strategies import make_strategy


def start_line(config: Config, num_users: int, run_dir: Path, resume: bool, warm: bool) -> str:
    """The run's first line: what runs, where its folder is, and what start-up is doing until the
    progress bar takes over (the workers' imports and model build take ~10-20 s on a laptop)."""
    what = "resuming" if resume else "starting"
    rounds = sum(p.rounds for p in make_strategy(config).phases())
    doing = ("the study's workers are warm" if warm else
             "start-up: the workers start and build the model while the driver prepares the adapter")
    return (f"fedpeft: {what} {config.federation.strategy} on {config.data.benchmark} ({num_users} users, "
            f"{rounds} rounds); run folder {run_dir}; {doing}")


class RunFailed(RuntimeError):
    """The simulation stopped before it finished; the message says why."""


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
    check_backbone_kind(config, bench.task().kind)  # an encoder for a generation task: before Ray starts
    check_cohort(config)  # before Ray starts (claim_run checks it again)
    check_participation(config)
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
    print(start_line(config, num_users, claimed.run_dir, resume, warm=ray_start is None and SharedRay.current is not None),
          flush=True)
    from flwr.simulation import run_simulation  # imported while Ray starts: it is not needed before

    from fedpeft.federation.client_app import app as client_app
    from fedpeft.federation.server_app import make_server_app, simulated_nodes
    logging.getLogger("flwr").setLevel(logging.ERROR)
    results: dict[str, Any] = {}
    interrupted = False
    try:
        if ray_start is not None:
            ray_start.wait()
            check_connected_ray(config)  # the local Ray as it started (checked before it started)
            if SharedRay.current is not None:  # a study's runs share it: the study shuts it down
                SharedRay.current.keep(ray_start)
                ray_start = None
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
        if ray_start is not None:  # this run's own Ray (not a study's)
            if ray.is_initialized():
                ray.shutdown()
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
