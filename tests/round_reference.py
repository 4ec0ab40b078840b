"""A plain reference of fedpeft's federated round arithmetic, written from the strategies' docs.

It shares no code with fedpeft's client, server, messages or strategies: the split of every
strategy, the cohorts, the seeds, FedProx's anchor and the server update (example-weighted mean,
FedAdam as Flower 1.41 defines it) are written out here in plain Python and numpy. It reuses only
what is tested on its own: building the model, the one function that composes a user's model
(common init < current shared part < the user's private part), the local trainer and predict.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.learning.models import adapter_state, build_model, compose_user_model
from fedpeft.learning.training import predict, train_user

Key = Callable[[str], bool]
State = dict[str, torch.Tensor]


def is_head(key: str) -> bool:
    return "classifier." in key or "score." in key


def layer_of(key: str) -> int | None:
    match = re.search(r"\.layer\.(\d+)\.", key)
    return int(match.group(1)) if match else None


def never(key: str) -> bool:
    return False


def always(key: str) -> bool:
    return True


@dataclass
class Phase:
    name: str
    rounds: int
    shared: Key = never
    frozen: Key = never
    work: list[tuple[Key, int | None]] = field(default_factory=list)  # (keys trained, explicit epochs) per pass
    everyone: bool = False
    epochs: int | None = None  # the phase's own epoch budget (None: train.steps / train.epochs)


def phases(cfg: Config) -> tuple[list[Phase], tuple[str, ...]]:
    """Each strategy's phases, as its documentation states them, and its extra adapters."""
    s, rounds = cfg.strategy, cfg.federation.rounds
    name = cfg.federation.strategy
    plain = [(always, None)]
    if name == "local_only":
        return [Phase("federated", rounds, work=plain)], ()
    if name == "fedavg":
        return [Phase("federated", rounds, shared=always, work=plain)], ()
    if name == "fedavg_ft":
        return [Phase("federated", rounds, shared=always, work=plain),
                Phase("finetune", 1, work=[(always, s.finetune_epochs)], everyone=True, epochs=s.finetune_epochs)], ()
    if name == "fedper":
        def lower(k: str) -> bool:
            return not is_head(k) and layer_of(k) is not None and layer_of(k) < s.fedper_layers
        return [Phase("federated", rounds, shared=lower, work=plain)], ()
    if name == "fedrep":
        def body(k: str) -> bool:
            return not is_head(k)
        return [Phase("federated", rounds, shared=body, work=[(is_head, s.fedrep_head_epochs), (body, None)])], ()
    if name == "fedsa":
        return [Phase("federated", rounds, shared=lambda k: ".lora_A." in k, work=plain)], ()
    if name == "ffa":
        def lora_a(k: str) -> bool:
            return ".lora_A." in k
        return [Phase("federated", rounds, shared=lambda k: ".lora_B." in k, frozen=lora_a,
                      work=[(lambda k: not lora_a(k), None)])], ()
    if name == "feddpa":
        def glob(k: str) -> bool:
            return ".default." in k and not is_head(k)
        return [Phase("federated", rounds, shared=glob,
                      work=[(lambda k: glob(k) or is_head(k), None), (lambda k: ".local." in k or is_head(k), None)])], ("local",)
    if name == "oppu":
        def personal(k: str) -> bool:
            return ".personal." in k

        def task_body(k: str) -> bool:
            return ".default." in k and not is_head(k)
        return [Phase("task", s.oppu_task_rounds, shared=lambda k: ".default." in k, frozen=personal,
                      work=[(lambda k: not personal(k), None)]),
                Phase("personal", rounds, frozen=task_body, work=[(lambda k: not task_body(k), None)])], ("personal",)
    if name == "ditto":  # the work is written out in ditto_train below: two passes, one adapter active in each
        return [Phase("federated", rounds, shared=lambda k: ".global." in k, work=[])], ("global",)
    raise ValueError(f"the reference does not know strategy {name!r}")


def cohort(cfg: Config, users: list[int], server_round: int) -> list[int]:
    fed = cfg.federation
    n = len(users)
    size = fed.cohort_size if fed.cohort_size > 0 else round(fed.cohort_fraction * n)
    size = max(1, min(n, size))
    if size == n:
        return list(users)
    rng = np.random.default_rng([cfg.seed, 10, server_round])
    return sorted(int(u) for u in rng.choice(list(users), size=size, replace=False))


def new_users(cfg: Config, n: int) -> list[int]:
    """data.new_users as its documentation states it: a fraction (rounded, at least 1) or a count (count:N or N >= 2),
    drawn with data.seed alone."""
    text = str(cfg.data.new_users)
    if text.startswith("count:"):  # count:N
        count = int(text[len("count:"):])
    else:
        share = float(text)
        if share <= 0:
            return []
        count = max(1, round(share * n)) if share < 1 else int(share)
    return sorted(int(i) for i in np.random.default_rng([cfg.data.seed, 60]).choice(n, size=count, replace=False))


def call_seed(cfg: Config, user: int, server_round: int) -> int:
    return int(np.random.default_rng([cfg.seed, 20, user, server_round]).integers(2**31 - 1))


def set_feddpa_mix(model: torch.nn.Module, alpha: float, r: int, mix: float) -> None:
    """feddpa: global adapter at (alpha/r) 2(1-mix), local at (alpha/r) 2 mix, in training and test."""
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "local" in scaling:
            scaling["default"] = alpha / r * 2 * (1 - mix)
            scaling["local"] = alpha / r * 2 * mix


def only_adapter(model: torch.nn.Module, name: str) -> None:
    """Make ``name`` the only active adapter of every LoRA layer (peft's own set_adapter)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter([name])


def ditto_train(cfg: Config, loaded, examples, task, seed: int, server: State, anchor: State | None) -> None:
    """Ditto's round on one user, as Algorithm 1 of Li et al. (2021) states it: local steps on the
    global adapter w from the w^t received (personal adapter off), then the personal adapter v and
    the head (global adapter off) on loss + lambda/2 ||v - w^t||^2, w^t the one RECEIVED."""
    received = {k.replace(".global.", ".default."): v.clone() for k, v in server.items()}
    mu = cfg.federation.proximal_mu if anchor else 0.0
    only_adapter(loaded.model, "global")
    train_user(loaded, examples, task, cfg, seed, trainable=lambda k: ".global." in k, lr=cfg.train.lr,
               anchor=anchor or None, mu=mu)
    only_adapter(loaded.model, "default")
    lam = cfg.strategy.ditto_lambda
    train_user(loaded, examples, task, cfg, seed, trainable=lambda k: ".global." not in k, lr=cfg.train.lr,
               epochs=cfg.strategy.ditto_personal_epochs or None, anchor=received if lam > 0 else None, mu=lam)


class ServerUpdate:
    """The new value of the keys shared in a round: weighted mean, or FedAdam on top of it.

    FedAdam as Flower 1.41 writes it: delta = mean - x; m = b1 m + (1-b1) delta;
    v = b2 v + (1-b2) delta^2; x += eta sqrt(1 - b2^(t+1)) / (1 - b1^(t+1)) m / (sqrt(v) + tau),
    with t the server round, and m, v kept across rounds."""

    def __init__(self, cfg: Config) -> None:
        self.fed = cfg.federation
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def __call__(self, server_round: int, current: dict[str, np.ndarray], sent: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
        total = sum(n for _, n in sent)
        mean = {}  # float32, summed in partition order: the same sum of the same terms as any weighted mean
        for state, n in sent:
            for k, value in state.items():
                mean[k] = mean[k] + value * (n / total) if k in mean else value * (n / total)
        if self.fed.server_optimizer in ("fedavg", "fedprox"):
            return mean
        f = self.fed
        out = {}
        for k, x in current.items():
            delta = mean[k] - x
            self.m[k] = f.server_beta1 * self.m.get(k, 0.0) + (1 - f.server_beta1) * delta
            self.v[k] = f.server_beta2 * self.v.get(k, 0.0) + (1 - f.server_beta2) * delta**2
            eta = f.server_lr * np.sqrt(1 - f.server_beta2 ** (server_round + 1)) / (1 - f.server_beta1 ** (server_round + 1))
            out[k] = x + eta * self.m[k] / (np.sqrt(self.v[k]) + f.server_tau)
        return out


@dataclass
class Outcome:
    shared: State
    private: dict[str, State]
    scores: dict[str, dict[str, float]]
    new_users: list[str] = field(default_factory=list)
    as_is: dict[str, dict[str, float]] = field(default_factory=dict)  # new users before the fine-tune (fedavg)
    new_examples: dict[str, float] = field(default_factory=dict)  # examples each new user's fine-tune processed


def run_reference(cfg: Config) -> Outcome:
    bench = get_benchmark(cfg)
    task, users = bench.task(), bench.user_ids()
    plan, extra = phases(cfg)
    loaded = build_model(cfg, len(task.labels), extra)
    keys = list(loaded.init_state)
    shared_any = [k for k in keys if any(p.shared(k) for p in plan)]
    server: State = {k: loaded.init_state[k].clone() for k in shared_any}
    ditto = "global" in extra
    if ditto:  # w^0 = v^0: the global adapter starts as the personal adapter's initialisation
        server = {k: loaded.init_state[k.replace(".global.", ".default.")].clone() for k in shared_any}
    private: dict[int, State] = {u: {} for u in range(len(users))}
    update = ServerUpdate(cfg)
    fedprox = cfg.federation.server_optimizer == "fedprox"

    def compose(u: int) -> None:
        compose_user_model(loaded, server, private[u])
        if "local" in extra:
            set_feddpa_mix(loaded.model, cfg.peft.alpha, cfg.peft.r, cfg.strategy.feddpa_mix)
        if ditto:  # the personal model: scored, and what a new user fine-tunes
            only_adapter(loaded.model, "default")

    held_out = new_users(cfg, len(users))
    trained = [u for u in range(len(users)) if u not in held_out]
    server_round = 0
    for phase in plan:
        for _ in range(phase.rounds):
            server_round += 1
            sent = []
            for u in (trained if phase.everyone else cohort(cfg, trained, server_round)):
                compose(u)
                anchor = {k: v for k, v in server.items() if phase.shared(k)} if fedprox else None
                examples = bench.load_user(u).train
                if ditto:
                    ditto_train(cfg, loaded, examples, task, call_seed(cfg, u, server_round), server, anchor)
                for trainable, epochs in phase.work:
                    train_user(loaded, examples, task, cfg, call_seed(cfg, u, server_round), trainable=trainable,
                               epochs=epochs, lr=cfg.train.lr, anchor=anchor or None,
                               mu=cfg.federation.proximal_mu if anchor else 0.0)
                state = adapter_state(loaded)
                private[u] = {k: v for k, v in state.items() if not phase.shared(k) and not phase.frozen(k)}
                mine = {k: v.numpy() for k, v in state.items() if phase.shared(k)}
                if mine:
                    sent.append((mine, len(examples)))
            if sent:
                current = {k: server[k].numpy() for k in sent[0][0]}
                for k, v in update(server_round, current, sent).items():
                    server[k] = torch.from_numpy(np.asarray(v, dtype=np.float32))

    def score(u: int) -> dict[str, float]:
        compose(u)
        test = bench.load_user(u).test
        predicted = predict(loaded, test, task, cfg)
        golds = [set(ex.labels) for ex in test]
        return {"accuracy": float(np.mean([p in g for p, g in zip(predicted, golds)])), "macro_f1": macro_f1(predicted, golds)}

    # new users: the final shared part, then the last phase's private keys (all it trains when it
    # keeps nothing private: fedavg) trained on the user's own data for new_user_epochs (0: the
    # last phase's budget), one pass, seeded with the round after the last
    last = plan[-1]
    own = [k for k in keys if not last.shared(k) and not last.frozen(k)] or [k for k in keys if not last.frozen(k)]
    as_is = {users[u]: score(u) for u in held_out} if all(k in shared_any for k in own) else {}
    new_examples = {}
    for u in held_out:
        compose(u)
        new_examples[users[u]] = train_user(loaded, bench.load_user(u).train, task, cfg, call_seed(cfg, u, server_round + 1),
                   trainable=set(own).__contains__, epochs=cfg.federation.new_user_epochs or last.epochs, lr=cfg.train.lr)["examples"]
        state = adapter_state(loaded)
        private[u] = {k: state[k] for k in own}

    scores = {user_id: score(u) for u, user_id in enumerate(users)}
    return Outcome(server, {users[u]: state for u, state in private.items()}, scores, [users[u] for u in held_out], as_is,
                   new_examples)


def macro_f1(predicted: list[str], golds: list[set[str]]) -> float:
    labels = sorted(set(predicted) | set().union(*golds))
    f1 = []
    for label in labels:
        tp = sum(p == label and label in g for p, g in zip(predicted, golds))
        fp = sum(p == label and label not in g for p, g in zip(predicted, golds))
        fn = sum(p != label and label in g for p, g in zip(predicted, golds))
        f1.append(2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 0.0)
    return float(np.mean(f1))
