"""Checks of a run against what it will run on, before the simulation starts: that one client
actor fits on a Ray node (``ray.client_cpus``, ``ray.client_gpus``), and that the cohort fits
the users who train (``federation.cohort_size``).

A client that fits no node makes Flower's Ray backend log "ActorPool is empty" and the run wait
forever; :func:`check_client_resources` refuses it instead, naming what the nodes have. It takes
the nodes as plain ``{"CPU": n, "GPU": n}`` dicts: :func:`local_node` for the local Ray that
``python -m fedpeft.sim`` is about to start (before it starts), :func:`ray_nodes` for the Ray it
is connected to (a cluster, or a Ray already running in this process).
"""

from __future__ import annotations

import os

from fedpeft.config import Config, ConfigError


def local_node(config: Config) -> dict[str, float]:
    """What the local Ray that ``ray.init`` starts will have: ``ray.num_cpus`` CPUs, or Ray's own
    count of this machine's cores (cgroup limits included); the GPUs torch sees (what a client
    trains on), counted only when clients ask for GPUs."""
    cpus: float = config.ray.num_cpus
    if not cpus:
        try:
            from ray._private.utils import get_num_cpus  # what ray.init counts

            cpus = get_num_cpus()
        except (ImportError, AttributeError):  # a Ray without it: the cores this process may use
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus = 0
    if config.ray.client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(cpus), "GPU": float(gpus)}


def ray_nodes() -> list[dict[str, float]]:
    """The CPUs and GPUs of each live node of the Ray this process is connected to."""
    import ray

    return [{"CPU": float(n["Resources"].get("CPU", 0)), "GPU": float(n["Resources"].get("GPU", 0))}
            for n in ray.nodes() if n.get("Alive") and n.get("Resources")]


def actors_on(node: dict[str, float], cpus: float, gpus: float) -> int:
    """Client actors that fit on ``node``: Flower's own count (``pool_size_from_resources``)."""
    count = int(node["CPU"] / cpus)
    if gpus > 0:
        count = min(count, int(node["GPU"] / gpus)) if node["GPU"] else 0
    return count


def _plural(count: float, word: str) -> str:
    number = f"{count:g}"
    return f"{number} {word}" if count == 1 else f"{number} {word}s"


def check_client_resources(config: Config, nodes: list[dict[str, float]], place: str) -> None:
    """Refuse a client (``ray.client_cpus`` CPUs, ``ray.client_gpus`` GPUs) that fits on none of
    ``nodes`` (``place`` names them: "the local Ray", "the Ray cluster at HOST:PORT")."""
    cpus, gpus = config.ray.client_cpus, config.ray.client_gpus
    if any(actors_on(node, cpus, gpus) for node in nodes):
        return
    has = "; ".join(f"{_plural(n['CPU'], 'CPU')}, {_plural(n['GPU'], 'GPU')}" for n in nodes[:8]) or "no live node"
    has += f"; and {len(nodes) - 8} more nodes" if len(nodes) > 8 else ""
    wants = f"ray.client_cpus={cpus:g}" + (f" and ray.client_gpus={gpus:g}" if gpus > 0 else "")
    most_cpus, most_gpus = max((n["CPU"] for n in nodes), default=0), max((n["GPU"] for n in nodes), default=0)
    fixes = []
    if not any(n["CPU"] >= cpus for n in nodes):
        fixes.append(f"ray.client_cpus={most_cpus:g} or less" if most_cpus else "a node with CPUs")
    if gpus > 0 and not any(n["GPU"] >= gpus for n in nodes):
        fixes.append(f"ray.client_gpus={most_gpus:g} or less (0.5 puts two clients on a GPU)" if most_gpus
                     else "ray.client_gpus=0 (clients on the CPU), or a machine with a GPU")
    if not fixes:  # enough CPUs on one node, enough GPUs on another
        fixes.append("ray.client_cpus and ray.client_gpus that one node has together")
    raise ConfigError(f"A client actor needs {wants} on one node, but {place} has no such node ({has}), so no client "
                      f"could start and the run would wait forever. Give {' and '.join(fixes)}.")


def where(config: Config) -> str:
    """The Ray a run's clients start on, in words."""
    if config.ray.address:
        return f"the Ray cluster at ray.address={config.ray.address}"
    cpus = f"ray.num_cpus={config.ray.num_cpus}" if config.ray.num_cpus else "all of this machine's cores"
    return f"the local Ray ({cpus})"


def check_local_ray(config: Config) -> None:
    """:func:`check_client_resources` for the local Ray about to start (before it starts)."""
    check_client_resources(config, [local_node(config)], where(config))


def check_connected_ray(config: Config) -> None:
    """:func:`check_client_resources` for the Ray this process is connected to."""
    check_client_resources(config, ray_nodes(), where(config))


def check_cohort(config: Config) -> None:
    """Refuse a ``federation.cohort_size`` above the users who train (the benchmark's users less
    ``data.new_users``; :meth:`fedpeft.strategies.base.Strategy.cohort_size` says it)."""
    from fedpeft.data import get_benchmark
    from fedpeft.data.user_groups import new_user_indices
    from fedpeft.strategies import make_strategy

    num_users = len(get_benchmark(config).user_ids())
    make_strategy(config).cohort_size(num_users - len(new_user_indices(config, num_users)))


def check_participation(config: Config) -> None:
    """Refuse, before anything starts, what ``federation.availability``, ``speed`` and
    ``deadline`` cannot run: a bad form or trace file, a round with no trained user online, a
    deadline no user can meet (fedpeft.federation.participation)."""
    from fedpeft.data import get_benchmark
    from fedpeft.data.user_groups import new_user_indices
    from fedpeft.federation.participation import Participation
    from fedpeft.learning.schedule import examples_of_steps, examples_per_call
    from fedpeft.strategies import make_strategy

    bench = get_benchmark(config)
    user_ids = bench.user_ids()
    rounds = sum(p.rounds for p in make_strategy(config).phases())
    participation = Participation(config, user_ids, rounds, bench)
    if not participation.active:
        return
    held_out = set(new_user_indices(config, len(user_ids)))
    trained = [i for i in range(len(user_ids)) if i not in held_out]
    examples = {}  # what a user must finish by the deadline: its local work, or under stragglers=partial one step
    if participation.deadline:
        for u in trained:
            n = len(bench.load_user(u).train)
            examples[u] = examples_of_steps(n, 1, config.train.batch_size) if participation.partial else examples_per_call(n, config)
    participation.check(trained, examples)
