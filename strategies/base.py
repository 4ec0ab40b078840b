"""The small base class every strategy builds on.

A strategy says, as key filters over the adapter's state dict, which keys are shared (sent to
the server and aggregated), which are frozen (never trained, always at their common
initialisation) and which are private (everything else: kept in the user's adapter store). It
may run in phases (e.g. federated rounds, then a local fine-tune) and may change how a client
trains locally. Aggregation of the shared keys uses Flower's own strategies.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.serverapp import strategy as flwr_strategy

from fedpeft.config import Config, ConfigError
from fedpeft.federation.aggregation import copy_reply, kept_momentum, prepare_round
from fedpeft.federation.messages import transport_state
from fedpeft.federation.privacy import PrivateAggregator, mean_reply
from fedpeft.federation.privacy_accounting import Release

State = dict[str, torch.Tensor]
HEAD_PATTERN = re.compile(r"(^|\.)(classifier|score)\.")
LAYER_PATTERN = re.compile(r"\.(?:layer|layers|block|h)\.(\d+)\.")
NEW_USERS = "new_users"  # the phase name of a new user's fine-tune (data.new_users), after the last round


def is_head(key: str) -> bool:
    return bool(HEAD_PATTERN.search(key))


def is_lora_a(key: str) -> bool:
    return ".lora_A." in key


def is_lora_b(key: str) -> bool:
    return ".lora_B." in key


def layer_index(key: str) -> int | None:
    match = LAYER_PATTERN.search(key)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Phase:
    """A stretch of rounds with one split. ``everyone``: all users train once per round."""

    name: str
    rounds: int
    everyone: bool = False
    epochs: int | None = None  # local epochs in this phase (None: train.epochs)


def flower_aggregator(config: Config) -> flwr_strategy.FedAvg:
    """Flower's strategy object whose ``aggregate_train`` aggregates the shared keys:
    ``federation.aggregator`` (how updates combine) or, with the mean, ``federation.server_optimizer``
    (the server's step on it); :func:`fedpeft.federation.aggregation.check_aggregator` refuses other pairs."""
    fed = config.federation
    common: dict[str, Any] = {"arrayrecord_key": "shared", "weighted_by_key": "num-examples"}
    robust: dict[str, Callable[[], flwr_strategy.FedAvg]] = {
        "median": lambda: flwr_strategy.FedMedian(**common),
        "trimmed_mean": lambda: flwr_strategy.FedTrimmedAvg(beta=fed.trim_beta, **common),
        "krum": lambda: flwr_strategy.Krum(num_malicious_nodes=fed.byzantine_users, **common),
        "multikrum": lambda: flwr_strategy.MultiKrum(num_malicious_nodes=fed.byzantine_users,
                                                     num_nodes_to_select=max(1, fed.multikrum_keep), **common),
        "qfedavg": lambda: flwr_strategy.QFedAvg(client_learning_rate=config.train.lr, q=fed.qffl_q,
                                                 train_loss_key="train_loss", **common),
    }
    if fed.aggregator in robust:
        return robust[fed.aggregator]()
    if fed.server_optimizer == "fedprox":
        return flwr_strategy.FedProx(proximal_mu=fed.proximal_mu, **common)
    if fed.server_optimizer == "fedavgm":
        return flwr_strategy.FedAvgM(server_learning_rate=fed.server_lr, server_momentum=fed.server_beta1, **common)
    if fed.server_optimizer == "fedadagrad":
        return flwr_strategy.FedAdagrad(eta=fed.server_lr, eta_l=config.train.lr, tau=fed.server_tau, **common)
    if fed.server_optimizer in ("fedadam", "fedyogi"):
        cls = flwr_strategy.FedAdam if fed.server_optimizer == "fedadam" else flwr_strategy.FedYogi
        return cls(eta=fed.server_lr, eta_l=config.train.lr, beta_1=fed.server_beta1, beta_2=fed.server_beta2,
                   tau=fed.server_tau, **common)
    return flwr_strategy.FedAvg(**common)


class Strategy:
    """Subclasses set ``name`` and override :meth:`is_shared` (and more where they need to)."""

    name: str = ""
    description: str = ""
    extra_adapters: tuple[str, ...] = ()  # more LoRA adapters next to "default"

    def __init__(self, config: Config) -> None:
        self.config = config
        self._aggregator: flwr_strategy.FedAvg | None = None
        self._private: PrivateAggregator | None = None  # privacy.mechanism != none: Flower's DP wrapper
        self._momentum: dict[str, np.ndarray] = {}  # FedAvgM's momentum, by key
        self.privacy_release: Release | None = None  # the last aggregate's release, for the accountant

    # ---- the split (client and server) -------------------------------------------------
    def is_shared(self, key: str, phase: str) -> bool:
        """Whether an adapter key is sent to the server in ``phase``."""
        return False

    def is_frozen(self, key: str, phase: str) -> bool:
        """Whether a key never trains in ``phase`` (it then keeps its common initial value)."""
        return False

    def split(self, state: State, phase: str) -> tuple[State, State]:
        """(shared, private) parts of an adapter state; frozen keys are in neither."""
        shared = {k: v for k, v in state.items() if self.is_shared(k, phase)}
        private = {k: v for k, v in state.items() if not self.is_shared(k, phase) and not self.is_frozen(k, phase)}
        return shared, private

    def phases(self) -> list[Phase]:
        return [Phase("federated", self.config.federation.rounds)]

    def new_user_keys(self, keys: list[str]) -> list[str]:
        """What a new user (``data.new_users``) trains on top of the final shared part: the keys
        private in the last phase (its own personal part); with nothing private there (fedavg),
        every key the last phase trains: the global model, fine-tuned."""
        last = self.phases()[-1].name
        trained = [k for k in keys if not self.is_frozen(k, last)]
        return [k for k in trained if not self.is_shared(k, last)] or trained

    def shared_keys(self, keys: list[str]) -> list[str]:
        """Keys shared in any phase: what the server holds and sends down."""
        return [k for k in keys if any(self.is_shared(k, p.name) for p in self.phases())]

    def incompatibility(self, keys: list[str]) -> str | None:
        """Why this strategy cannot split an adapter with these keys, or None if it can."""
        return None

    @staticmethod
    def needs_lora(keys: list[str], what: str) -> str | None:
        """The refusal reason for a strategy that splits or stacks LoRA matrices, or None."""
        return None if any(is_lora_a(k) for k in keys) else f"{what} (needs peft.method=lora or dora)"

    def check_compatible(self, keys: list[str]) -> None:
        """Refuse, before anything starts, an adapter this strategy cannot split."""
        why = self.incompatibility(keys)
        if why:
            from fedpeft.strategies import STRATEGIES

            fits = [n for n, cls in sorted(STRATEGIES.items()) if cls(self.config).incompatibility(keys) is None]
            raise ConfigError(f"Strategy '{self.name}' does not fit this adapter: {why}. "
                              f"Strategies that fit it: {', '.join(fits) or 'none'}.")

    def pretrain(self, loaded: Any, load_users: Callable[[], list[Any]], task: Any) -> dict[str, float] | None:
        """Central training in the driver before the simulation (e.g. OPPU's pooled task adapter);
        returns its statistics, or None when the strategy has none."""
        return None

    # ---- the client ----------------------------------------------------------------------
    def configure_model(self, loaded: Any, phase: str) -> None:
        """Adjust the freshly loaded user model before a client trains or scores it."""

    def prepare_export(self, loaded: Any) -> None:
        """Make the user's model, about to be saved as a peft folder, load back as it is scored
        (e.g. mixing weights written into the adapters' configs); refuse what a folder cannot hold."""

    def predict(self, loaded: Any, user: Any, task: Any) -> list[str]:
        """The user's predictions on its test split (strategies may score differently).

        With ``peft.method=few_shot`` the prompt starts with k of the user's own training examples."""
        from fedpeft.learning.training import predict

        shots = user.train[: self.config.peft.few_shot_k] if self.config.peft.method == "few_shot" else None
        return predict(loaded, user.test, task, self.config, shots=shots)

    def local_train(self, train: Callable[..., dict[str, float]], phase: Phase) -> dict[str, float]:
        """One client's local work in a round. ``train(trainable=..., epochs=...)`` runs the loop."""
        return train(trainable=lambda k: not self.is_frozen(k, phase.name), epochs=phase.epochs)

    # ---- the server ----------------------------------------------------------------------
    def cohort_size(self, num_users: int) -> int:
        """Users sampled per round out of the ``num_users`` who train. A ``federation.cohort_size``
        above them is refused, before the run starts (:func:`fedpeft.sim.check_cohort`): clamped,
        the run would be another experiment than the one asked for (a privacy accounting at
        another sampling rate, a comparison whose cohorts differ from what its config says)."""
        fed = self.config.federation
        if fed.cohort_size > num_users:
            raise ConfigError(f"federation.cohort_size={fed.cohort_size} is more than the {num_users} users who train in this "
                              f"run (the benchmark's users less data.new_users). Give a size of at most {num_users}, or "
                              "federation.cohort_size=0 and federation.cohort_fraction=1.0 for every user each round.")
        size = fed.cohort_size if fed.cohort_size > 0 else round(fed.cohort_fraction * num_users)
        return max(1, min(num_users, size))

    def sample_cohort(self, users: list[int], server_round: int, phase: Phase | None = None) -> list[int]:
        """Users (partition ids) that train in ``server_round``; deterministic from the seed."""
        size = len(users) if phase is not None and phase.everyone else self.cohort_size(len(users))
        if size == len(users):
            return sorted(users)
        rng = np.random.default_rng([self.config.seed, 10, server_round])
        return sorted(int(u) for u in rng.choice(sorted(users), size=size, replace=False))

    SERVER_STATE = ("m_t", "v_t")  # the FedOpt family's moments; FedAvg and FedProx keep none
    MOMENTUM = "momentum"  # FedAvgM's momentum (kept by key in :attr:`_momentum`)
    CLIPPING_NORM = "privacy/clipping_norm"  # central_adaptive: the clipping norm it has adapted to

    def server_state(self) -> State:
        """The server optimiser's state between rounds (for checkpoints), as named tensors."""
        state = {f"{name}/{key}": torch.from_numpy(np.array(value)) for name in self.SERVER_STATE
                 for key, value in (getattr(self._aggregator, name, None) or {}).items()}
        state.update({f"{self.MOMENTUM}/{key}": torch.from_numpy(np.array(value)) for key, value in self._momentum.items()})
        if self._private is not None and self.config.privacy.mechanism == "central_adaptive":
            state[self.CLIPPING_NORM] = torch.tensor([self._private.clipping_norm], dtype=torch.float64)
        return state

    def load_server_state(self, state: State) -> None:
        """Restore :meth:`server_state` (a resumed run continues the same optimiser)."""
        if self._aggregator is None:
            self._aggregator = flower_aggregator(self.config)
        for name in self.SERVER_STATE:
            part = {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith(f"{name}/")}
            if part:
                setattr(self._aggregator, name, part)
        self._momentum = {k.split("/", 1)[1]: v.numpy() for k, v in state.items() if k.startswith(f"{self.MOMENTUM}/")}
        if self.CLIPPING_NORM in state:
            self._private = self._private or PrivateAggregator(self.config)
            self._private.clipping_norm = float(state[self.CLIPPING_NORM].item())

    def aggregate(self, server_round: int, shared: State, replies: list[Message], sampled: int | None = None,
                  phase: str | None = None) -> State:
        """New shared state from the replies' "shared" arrays with the configured Flower strategy.

        With ``privacy.mechanism`` set, Flower's DP wrapper first makes the noisy sum of the clipped
        updates divided by ``sampled``, the users sampled this round, which the caller must give
        (:class:`fedpeft.federation.privacy.PrivateAggregator`: a sampled user that did not reply counts as a
        zero update), and the Flower strategy steps on that one mean (post-processing: FedAvg/FedProx
        return it, FedAdam/FedYogi move towards it). A round in ``phase`` that shares keys releases
        even when no user replied (noise around the current shared part); without ``phase`` the
        keys are the replies'. The round's release is left in :attr:`privacy_release` for the
        accountant.
        """
        replies = [r for r in replies if len(r.content.array_records["shared"])]
        self.privacy_release = None
        private = self.config.privacy.mechanism != "none"
        keys = [k for k in shared if self.is_shared(k, phase)] if private and phase is not None else None
        if not shared or not (replies or keys):
            return shared
        if self._aggregator is None:
            self._aggregator = flower_aggregator(self.config)
        aggregator = self._aggregator
        if private:
            replies = [self._private_mean(server_round, shared, replies, sampled, keys)]
        else:  # some of Flower's strategies consume the arrays they read; the server still counts them
            replies = [copy_reply(r) for r in replies]
        order = prepare_round(aggregator, transport_state(shared), replies, self.config, self._momentum)
        arrays, _ = aggregator.aggregate_train(server_round, replies)
        self._momentum = kept_momentum(aggregator, order, self._momentum)
        if arrays is None:
            raise RuntimeError("Flower's aggregation returned nothing; the replies were inconsistent")
        new = ArrayRecord.to_torch_state_dict(arrays)
        return {**shared, **{k: new[k].to(shared[k].dtype) for k in new}}

    def _private_mean(self, server_round: int, shared: State, replies: list[Message], sampled: int | None,
                      keys: list[str] | None) -> Message:
        """The noisy mean over the users sampled as one reply, for the Flower strategy to step on."""
        if sampled is None:
            raise ValueError("Strategy.aggregate under privacy needs sampled= (the users sampled this round)")
        self._private = self._private or PrivateAggregator(self.config)
        current = {k: v.detach().cpu().numpy() for k, v in transport_state(shared).items()}
        mean, self.privacy_release = self._private.aggregate(server_round, current, replies, sampled, keys)
        return mean_reply(mean, self._aggregator.weighted_by_key, replies[0] if replies else None)
