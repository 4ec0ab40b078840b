"""What a run's parts must agree on, checked before any compute: one place for fedpeft.sim and studies.

:func:`check_fits` is what ``python -m fedpeft.sim`` refuses in its driver before the simulation
starts, once the backbone with its adapter is built: the PEFT method and the task against the
backbone's kind, the strategy against the adapter's keys, packing (``train.pack_users``), the
aggregator (``federation.aggregator`` with the server optimizer, privacy and users per round) and
privacy (which also resolves δ and calibrates the noise into ``config.privacy``).
:func:`check_study_runs` checks every run of a study (sims/compare.py, where_sharing_pays.py,
privacy.py) the way fedpeft.sim checks one before Ray starts (the cluster address and what a
client needs of the local Ray, W&B, the backbone, the round-selection rule, the data and the
cohort, then :func:`check_fits`), before the study's first run starts, and refuses with one
line per misfit.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpeft.config import Config, ConfigError


def check_fits(config: Config, strategy: Any, bench: Any, loaded: Any) -> tuple[list[str], set[int]]:
    """Refuse (ConfigError) a run whose strategy, PEFT method, backbone, packing or privacy do not
    fit together; returns the adapter's keys and the indices of the held-out new users (who never
    train before the end). Sets ``config.privacy``'s δ and calibrated noise
    (:func:`fedpeft.federation.privacy_checks.prepare_privacy`)."""
    from fedpeft.data.user_groups import new_user_indices
    from fedpeft.federation.aggregation import check_aggregator
    from fedpeft.federation.privacy_checks import prepare_privacy
    from fedpeft.learning.packable import check_packing

    check_kind(config, loaded.kind, bench.task().kind)
    keys = loaded.adapter_keys
    strategy.check_compatible(keys)
    check_packing(config, strategy.name, strategy.extra_adapters, loaded)  # train.pack_users > 1: what packs
    held_out = set(new_user_indices(config, len(bench.user_ids())))
    check_aggregator(config, strategy.cohort_size(len(bench.user_ids()) - len(held_out)))  # federation.aggregator
    # DP: refuse what cannot be private, fix delta, calibrate the noise to privacy.target_epsilon (before config.yaml)
    prepare_privacy(config, strategy, keys, len(bench.user_ids()) - len(held_out))
    return keys, held_out


def check_kind(config: Config, kind: str, task_kind: str) -> None:
    """Refuse an encoder backbone (``kind``) for a generation task or a method that trains nothing."""
    from fedpeft.learning.peft_methods import NO_TRAINING

    if kind == "encoder" and (config.peft.method in NO_TRAINING or task_kind == "generation"):
        why = f"peft.method={config.peft.method}" if config.peft.method in NO_TRAINING else f"'{config.data.benchmark}' is a generation task"
        raise ConfigError(f"{why} needs a generative backbone (seq2seq such as google/flan-t5-base, or causal), "
                          f"but '{config.model.name}' is an encoder with a classification head. Pick one with --model.")


def check_backbone_kind(config: Config, task_kind: str) -> None:
    """:func:`check_kind` before anything starts: the backbone's kind read off its config file."""
    from transformers import AutoConfig

    from fedpeft.learning.model_files import resolve_model_path
    from fedpeft.learning.models import backbone_kind

    check_kind(config, backbone_kind(config, AutoConfig.from_pretrained(resolve_model_path(config.model.name))), task_kind)


class _Models:
    """The last backbone built for a check, reused by the next run that needs the same one (the
    seed changes its initial values, never its keys, kinds or layers)."""

    def __init__(self) -> None:
        self.key: str | None = None
        self.loaded: Any = None

    def get(self, config: Config, num_labels: int, extra_adapters: tuple[str, ...]) -> Any:
        from fedpeft.learning.models import build_model

        key = model_key(config, num_labels, extra_adapters)
        if key != self.key:
            self.key, self.loaded = None, None  # one model at a time: the last one goes first
            self.loaded, self.key = build_model(config, num_labels, extra_adapters), key
        return self.loaded


def model_key(config: Config, num_labels: int, extra_adapters: tuple[str, ...]) -> str:
    return json.dumps([config.model.name, config.model.dtype, sorted(vars(config.peft).items()), num_labels,
                       list(extra_adapters)], default=str)


def run_misfit(config: Config, models: _Models) -> str | None:
    """Why fedpeft.sim would refuse this run before its simulation starts, or None when it fits.
    Works on a copy: ``config`` is left as it is."""
    from fedpeft.data import get_benchmark
    from fedpeft.federation.selection import check_selection
    from fedpeft.launch.preflight import check_cohort, check_participation
    from fedpeft.learning.model_files import check_model
    from fedpeft.learning.models import fit_size_knob
    from fedpeft.strategies import make_strategy

    cfg = copy.deepcopy(config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a library's notes on the model it builds: the run shows them, if any
            check_model(cfg)
            check_selection(cfg)
            strategy = make_strategy(cfg)
            bench = get_benchmark(cfg)
            check_cohort(cfg)
            check_participation(cfg)
            num_labels = len(bench.task().labels)
            if cfg.peft.target_params:
                fit_size_knob(cfg, num_labels)
            check_fits(cfg, strategy, bench, models.get(cfg, num_labels, strategy.extra_adapters))
    except ConfigError as err:
        return str(err)
    return None


def _same_run_key(config: Config) -> str:
    """What decides whether a run fits: everything but its seed and where it writes."""
    data = config.to_dict()
    data.pop("seed", None)
    data.pop("output", None)
    return json.dumps(data, sort_keys=True, default=str)


def study_misfits(configs: Sequence[Config], root: Path) -> list[str]:
    """One line per reason some of ``configs`` cannot run, naming their run folders (relative to
    ``root``); empty when every run fits. Runs that differ only in seed and folder are checked once."""
    from fedpeft.launch.preflight import check_local_ray
    from fedpeft.launch.ray_start import check_ray_address
    from fedpeft.launch.wandb_preflight import check_wandb_online

    def check_ray(cfg: Config) -> None:  # the cluster answers; a client fits the local Ray that will start
        check_ray_address(cfg.ray.address)
        if not cfg.ray.address:
            check_local_ray(cfg)

    lines: list[str] = []
    checked: set[str] = set()
    for cfg in configs:  # the same for most studies' runs: checked once per value
        for key, check in ((f"ray {cfg.ray!r}", check_ray), (f"wandb {cfg.wandb!r}", check_wandb_online)):
            if key not in checked:
                checked.add(key)
                try:
                    check(cfg)
                except ConfigError as err:
                    lines.append(str(err))
    groups: dict[str, list[Config]] = {}
    for cfg in configs:
        groups.setdefault(_same_run_key(cfg), []).append(cfg)
    models = _Models()
    reasons = {key: run_misfit(groups[key][0], models)  # in an order that builds each backbone once
               for key in sorted(groups, key=lambda k: (groups[k][0].model.name, groups[k][0].federation.strategy))}
    why: dict[str, list[str]] = {}  # reason -> its run folders, in the order the study runs them
    for cfg in configs:
        if (reason := reasons[_same_run_key(cfg)]) is not None:
            why.setdefault(reason, []).append(folder(cfg, root))
    return lines + [f"{', '.join(folders)}: {reason}" for reason, folders in why.items()]


def folder(config: Config, root: Path) -> str:
    """A run's folder, relative to ``root`` where it lies inside it."""
    path = Path(config.output.dir) / config.output.name
    return os.path.relpath(path, root) if path.is_relative_to(root) else str(path)


def check_study_runs(configs: Sequence[Config], root: Path) -> None:
    """Refuse (ConfigError) a study with any run that would be refused before its simulation,
    listing every misfit, one line each; nothing has been run or written."""
    misfits = study_misfits(configs, root)
    if misfits:
        raise ConfigError(f"{len(misfits)} problem(s) found in the study's {len(configs)} runs before any started; "
                          "nothing was run. Fix them (or leave those strategies out) and start again:\n"
                          + "\n".join(f"  - {line}" for line in misfits))
