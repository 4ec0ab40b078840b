"""fedpeft as a Flower app: ``flwr run .`` (``[tool.flwr.app]`` in pyproject.toml).

The run config holds fedpeft's config under the same dotted keys (``[tool.flwr.app.config]``
lists every key of the schema with its default; ``flwr run . --run-config "train.lr=0.001"``
sets one). The ServerApp assembles and checks the config like ``python -m fedpeft.sim``, then
goes the same way: :func:`fedpeft.launch.prepare.prepare_run`, then :func:`fedpeft.federation.server_app.run_prepared`.
The ClientApp is :data:`fedpeft.federation.client_app.app`. What runs is the installed fedpeft: the app's
FAB carries its pyproject.toml and configs only (``fab-include``), never a second copy of the code.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import Config, ConfigError
from fedpeft.config_checks import iter_fields

server_app = ServerApp()
NODES_SETTLE_SECONDS, NODES_MAX_WAIT = 2.0, 60.0


def run_config_defaults() -> dict[str, bool | int | float | str]:
    """What ``[tool.flwr.app.config]`` must hold: every schema key with its default (Flower's run
    config has no lists: a list is a comma string, as on fedpeft's command line)."""
    return {key: ",".join(default) if isinstance(default, list) else default for key, _, default, _ in iter_fields()}


def wait_for_nodes(grid: Grid, expected: int, num_users: int) -> None:
    """Refuse a federation whose number of SuperNodes is not the run's node count
    (:func:`fedpeft.federation.server_app.simulated_nodes`: one per user, up to 2 x message_window)."""
    deadline, count, settled = time.time() + NODES_MAX_WAIT, -1, time.time()
    while time.time() < deadline:
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, settled = now, time.time()
        elif count >= expected or time.time() - settled > NODES_SETTLE_SECONDS:
            break
        time.sleep(0.2)
    if count != expected:
        raise ConfigError(f"The federation has {count} SuperNodes, but this run carries its {num_users} users' calls on "
                          f"{expected} nodes (federation.num_nodes; 0 = one per user, up to 2 x federation.message_window). "
                          f"Run `flwr run . --federation-config \"num-supernodes={expected}\"`.")


def run_flower(config: Config, grid: Grid) -> dict[str, Any]:
    """One fedpeft run on a Flower grid started by ``flwr run``: the checks and the code path of
    ``python -m fedpeft.sim`` (Flower has already started the simulation engine)."""
    from fedpeft.data import get_benchmark
    from fedpeft.federation.checkpoint import release_run_dir
    from fedpeft.federation.reporting import summary_table
    from fedpeft.federation.server_app import run_prepared, simulated_nodes
    from fedpeft.launch.prepare import prepare_run
    from fedpeft.launch.wandb_preflight import check_wandb_online

    check_wandb_online(config)
    num_users = len(get_benchmark(config).user_ids())
    wait_for_nodes(grid, simulated_nodes(config, num_users), num_users)
    prepared = prepare_run(config)
    try:  # the run folder's claim ends with the run (Flower may keep this process for the next one)
        results = run_prepared(config, prepared, grid)
    finally:
        release_run_dir(prepared.run_dir)
    print(summary_table(results), flush=True)
    return results


class FailedRun(RuntimeError):
    """A run whose verdict is ``failed`` (fedpeft.federation.verdict), raised out of the ServerApp
    so that Flower records the run as failed (``flwr ls`` shows ``finished:failed``), as
    ``python -m fedpeft.sim`` exits 3 for it. Its files are all written first."""


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from fedpeft.federation.verdict import failed_run_line
    from fedpeft.launch.assemble import config_from_run_config

    results = run_flower(config_from_run_config(dict(context.run_config)), grid)
    if results.get("status") == "failed":  # `flwr run` itself exits 0 whatever the run's status (Flower's CLI)
        raise FailedRun(failed_run_line(results))
