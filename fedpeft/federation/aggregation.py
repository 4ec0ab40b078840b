"""What fedpeft adds around Flower's aggregating strategies (``federation.server_optimizer`` and
``federation.aggregator``): the refusals before start, and each round's hand-over.

Flower's strategies do the arithmetic (:func:`fedpeft.strategies.base.flower_aggregator` builds
them). Around them, per round: Flower's median, trimmed mean and q-FedAvg consume the reply arrays
they read, so they get shallow copies (the server still counts the bytes sent); FedAvgM, q-FedAvg
and the FedOpt family get the server's current shared part, restricted to the keys the replies
carry in the replies' order (FedAvgM and q-FedAvg pair arrays by position); FedAvgM's momentum is
kept by key between rounds (for checkpoints); multikrum_keep=0 keeps the replies less f.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedpeft.config import Config, ConfigError

MEAN_ONLY = ("fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")  # Flower steps on the weighted mean
KRUM = ("krum", "multikrum")


def aggregator_misfit(config: Config, per_round: int) -> str | None:
    """Why ``federation.aggregator`` cannot run with the rest of ``config`` and ``per_round``
    users sampled per round, naming what fits; None when it fits."""
    fed = config.federation
    agg = fed.aggregator
    if agg == "mean":
        return None
    if config.privacy.mechanism != "none":
        return (f"federation.aggregator={agg} does not fit privacy.mechanism={config.privacy.mechanism}: the DP "
                "mechanism bounds the sensitivity of a mean of clipped updates, not of a median, trimmed mean, "
                "Krum selection or q-FFL reweighting. Use federation.aggregator=mean with privacy, or "
                "privacy.mechanism=none.")
    if fed.server_optimizer != "fedavg":
        return (f"federation.server_optimizer={fed.server_optimizer} does not fit federation.aggregator={agg}: "
                f"Flower's {fed.server_optimizer} steps on the example-weighted mean only. Use "
                f"federation.aggregator=mean with server_optimizer={fed.server_optimizer}, or "
                f"server_optimizer=fedavg with aggregator={agg}.")
    f = fed.byzantine_users
    if agg in KRUM and per_round < 2 * f + 3:
        return (f"federation.aggregator={agg} with federation.byzantine_users={f} needs at least 2f + 3 = {2 * f + 3} "
                f"users per round, but this run samples {per_round}. Sample more users per round "
                f"(federation.cohort_size / cohort_fraction) or lower byzantine_users to at most {max(0, (per_round - 3) // 2)}"
                + (" (no f fits)." if per_round < 3 else "."))
    if agg == "multikrum" and fed.multikrum_keep > per_round - f:
        return (f"federation.multikrum_keep={fed.multikrum_keep} is more than the users per round less "
                f"byzantine_users ({per_round} - {f} = {per_round - f}). Keep at most {per_round - f}, or 0 for that.")
    return None


def check_aggregator(config: Config, per_round: int) -> None:
    """Refuse (ConfigError) what :func:`aggregator_misfit` finds."""
    why = aggregator_misfit(config, per_round)
    if why:
        raise ConfigError(why)


def copy_reply(reply: Message) -> Message:
    """A reply whose "shared" ArrayRecord is a new record of the same arrays (Flower's FedMedian,
    FedTrimmedAvg and QFedAvg pop or clear the records they read)."""
    content = reply.content
    copied = RecordDict({"shared": ArrayRecord(dict(content.array_records["shared"].items())),
                         **{name: record for name, record in content.metric_records.items()}})
    return Message(content=copied, metadata=reply.metadata)


def prepare_round(aggregator: Any, shared: dict[str, torch.Tensor], replies: list[Message], config: Config,
                  momentum: dict[str, np.ndarray]) -> list[str]:
    """Hand ``aggregator`` what it keeps of the server before ``aggregate_train``; returns the keys
    the replies carry, in their order."""
    order = list(replies[0].content.array_records["shared"].keys())
    current = {k: shared[k].detach().cpu().numpy() for k in order}
    if isinstance(aggregator, FedOpt):  # FedAdam, FedYogi, FedAdagrad: by key
        aggregator.current_arrays = current
    elif isinstance(aggregator, (flwr_strategy.FedAvgM, flwr_strategy.QFedAvg)):  # by position: the replies' order
        aggregator.current_arrays = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in current.items()})
        if isinstance(aggregator, flwr_strategy.FedAvgM):
            aggregator.momentum_vector = [momentum[k] for k in order] if set(order) <= set(momentum) else None
    elif type(aggregator) is flwr_strategy.MultiKrum and not config.federation.multikrum_keep:  # not Krum (keeps 1)
        aggregator.num_nodes_to_select = max(1, len(replies) - config.federation.byzantine_users)
    return order


def kept_momentum(aggregator: Any, order: list[str], momentum: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """FedAvgM's momentum after a round, by key (the keys of other phases kept)."""
    vector = getattr(aggregator, "momentum_vector", None)
    return {**momentum, **dict(zip(order, vector, strict=True))} if vector is not None else momentum
