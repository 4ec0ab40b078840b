"""Packed training and prediction: k users' LoRA adapters in one forward pass (issue 20).

The cached peft model is shared; the k users' adapters are not loaded into it. For the packed
step, every peft LoRA ``Linear`` layer computes its frozen base output once for all rows, and
each row adds its own user's delta ``B_u A_u x * scaling``, with the users' A and B stacked as
[k, r, in] and [k, out, r] and applied by ``torch.bmm`` (rows are grouped by user; equal groups
are one [k, rows, in] bmm, unequal ones gather each row's matrices). The task head that peft's
``modules_to_save`` trains (``classifier`` / ``score``) is stacked the same way. The model's own
adapter weights are not read and the model is restored after the step.

Users stay independent: the loss is the sum of per-user mean losses (no gradient crosses users),
each user has its own leaf tensors and its own ``torch.optim.AdamW`` (so its own state, step
count and learning rate), its own seed, batch order (:func:`fedpeft.learning.training.batch_order`),
step budget, FedProx anchor and divergence checks, exactly as :func:`fedpeft.learning.training.train_user`
draws and does them. A user whose steps are done sends no rows and its optimizer does not step
(no update, no weight decay, no moment update). With dropout off (backbone and adapter), a
user's result equals ``compose_user_model`` + ``train_user`` up to float reassociation of the
batched matmuls; with dropout on, the draws differ (the packed step draws from one stream,
seeded with the first user's seed).

What packs is :func:`packing_incompatibility`'s business; this module imports neither flwr nor
ray (the GPU benchmark ``sims/pack_bench.py`` runs it with torch, transformers and peft alone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedpeft.config import Config, ConfigError
from fedpeft.data import Example, TaskSpec
from fedpeft.learning.models import LoadedModel
from fedpeft.learning.peft_methods import METHODS, NO_TRAINING
from fedpeft.learning.training import (
    CallTokens,
    TrainingDiverged,
    batch_listeners_active,
    batch_order,
    check_finite_weights,
    check_step_loss,
    check_training_examples,
    encoder_loss_of_logits,
    predict_batch,
    proximal_term,
    seed_torch,
    step_budget,
    text_to_text_batch,
    train_result,
    untrained_result,
)

State = dict[str, torch.Tensor]
ADAPTER = "default"

# ---- what packs ----------------------------------------------------------------------------------

PACKABLE_METHODS = ("lora",)
PACKABLE_STRATEGIES = ("local_only", "fedavg", "fedavg_ft", "fedper", "fedrep", "fedsa", "ffa")
_WHY_NOT_METHOD = {
    "dora": "DoRA rescales each user's whole weight W + BA by its own column norm, which is not a per-row delta",
    "loha": "LoHa's delta is a Hadamard product of two low-rank products, not one stacked A/B pair",
    "lokr": "LoKr's delta is a Kronecker product, not one stacked A/B pair",
    "vera": "VeRA's shared random matrices and per-user scaling vectors are not stacked here",
    "ia3": "IA3 rescales activations per user (a different packed layer, not built)",
    "prompt_tuning": "virtual tokens change each user's input sequence, not a linear layer's output",
    "prefix_tuning": "per-user prefixes enter every attention layer's keys and values, not a linear layer's output",
    "p_tuning": "a per-user prompt encoder changes each user's input sequence, not a linear layer's output",
    "bottleneck": "bottleneck adapters are extra per-user modules, not a linear layer's low-rank delta",
    "zero_shot": "nothing trains: there is no adapter to pack",
    "few_shot": "nothing trains, and each user's prompt carries its own demonstrations",
}
_WHY_NOT_STRATEGY = {
    "oppu": "oppu stacks a personal LoRA adapter on a task adapter (two adapters per user)",
    "feddpa": "feddpa mixes a global and a local adapter per input (two adapters per user, per-row mixing weights)",
}


def packing_incompatibility(config_or_method: Config | str, strategy_name: str,
                            extra_adapters: Sequence[str] = ()) -> str | None:
    """Why ``train.pack_users`` > 1 cannot run this method and strategy, or None when it can.

    Packs: peft.method in {PACKABLE_METHODS} with one adapter, strategies {PACKABLE_STRATEGIES}.
    """
    method = config_or_method if isinstance(config_or_method, str) else config_or_method.peft.method
    fits = (f"Packing (train.pack_users > 1) fits peft.method={'/'.join(PACKABLE_METHODS)} with the strategies "
            f"{', '.join(PACKABLE_STRATEGIES)}; set train.pack_users=1 to run this one user per call.")
    if method not in PACKABLE_METHODS:
        why = _WHY_NOT_METHOD.get(method, f"'{method}' is not one of the known methods {', '.join(METHODS)}")
        return f"peft.method={method} does not pack: {why}. {fits}"
    if strategy_name in _WHY_NOT_STRATEGY:
        return f"strategy {strategy_name} does not pack: {_WHY_NOT_STRATEGY[strategy_name]}. {fits}"
    if extra_adapters:
        return (f"strategy {strategy_name} adds adapters {', '.join(extra_adapters)} beside 'default': "
                f"a packed layer holds one adapter per user. {fits}")
    if strategy_name not in PACKABLE_STRATEGIES:
        return (f"strategy {strategy_name} is not known to pack (its local training must call train(trainable=, "
                f"epochs=) the same way for every user, with no batch listener or extra adapter). {fits}")
    return None


def check_packing(config: Config, strategy_name: str, extra_adapters: Sequence[str], loaded: LoadedModel) -> None:
    """Refuse ``train.pack_users`` > 1 before the run starts where it cannot pack (the method,
    the strategy, or a LoRA layer or head the packed model cannot stack), saying what packs."""
    if config.train.pack_users <= 1:
        return
    why = packing_incompatibility(config, strategy_name, extra_adapters)
    if why is None:
        try:
            _PackedModel.of(loaded)
        except ValueError as err:
            why = str(err)
    if why is not None:
        raise ConfigError(f"train.pack_users={config.train.pack_users}: {why}")


# ---- the packed layers -----------------------------------------------------------------------------

class _Rows:
    """The packed batch's rows, grouped by user (user j owns ``groups[j]`` consecutive rows), and
    the active users' stacked adapter tensors, keyed as the adapter's state dict."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.groups: list[int] = []
        self.stacks: dict[str, torch.Tensor] = {}
        self._row_user: torch.Tensor | None = None

    def set(self, values: list[dict[str, torch.Tensor]], groups: list[int]) -> None:
        self.groups = list(groups)
        self.stacks = {key: torch.stack([v[key] for v in values]) for key in values[0]}
        self._row_user = None

    @property
    def equal(self) -> bool:
        return len(set(self.groups)) == 1

    def row_user(self) -> torch.Tensor:
        if self._row_user is None:
            counts = torch.tensor(self.groups)
            self._row_user = torch.repeat_interleave(torch.arange(len(self.groups)), counts).to(self.device)
        return self._row_user

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Row n of ``x`` ([rows, ..., in]) times its user's ``weight`` ([k, out, in]) transposed."""
        k, rows, width = len(self.groups), x.shape[0], x.shape[-1]
        if rows != sum(self.groups):
            raise RuntimeError(f"a packed layer got {rows} rows; the packed batch has {sum(self.groups)} "
                               f"(users' groups {self.groups})")
        if self.equal:  # one [k, group rows, in] x [k, in, out] product
            y = torch.bmm(x.reshape(k, -1, width), weight.transpose(1, 2))
            if bias is not None:
                y = y + bias.unsqueeze(1)
        else:  # unequal groups: each row gathers its user's matrix
            index = self.row_user()
            y = torch.bmm(x.reshape(rows, -1, width), weight.index_select(0, index).transpose(1, 2))
            if bias is not None:
                y = y + bias.index_select(0, index).unsqueeze(1)
        return y.reshape(*x.shape[:-1], weight.shape[1])

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x, self.groups))


def _lora_forward(layer: Any, rows: _Rows, key_a: str, key_b: str) -> Callable[..., torch.Tensor]:
    """peft's ``lora.Linear.forward`` for vanilla LoRA, with each row's own A and B."""
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        a, b = rows.stacks[key_a], rows.stacks[key_b]
        h = layer.lora_dropout[ADAPTER](layer._cast_input_dtype(x, a.dtype))
        result = result + rows.linear(rows.linear(h, a), b) * layer.scaling[ADAPTER]
        return result.to(result_dtype)
    return forward


def _head_forward(wrapper: Any, rows: _Rows, keys: dict[str, str]) -> Callable[..., torch.Tensor]:
    """A ``modules_to_save`` head with each row's own weights: a Linear as one stacked product,
    any other module per user with ``torch.func.functional_call`` on its rows."""
    module = wrapper.modules_to_save[ADAPTER]

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise RuntimeError(f"a packed head takes one input tensor; {type(module).__name__} got more")
        if isinstance(module, torch.nn.Linear):
            bias = rows.stacks[keys["bias"]] if "bias" in keys else None
            return rows.linear(x, rows.stacks[keys["weight"]], bias)
        parts = rows.split(x)
        return torch.cat([torch.func.functional_call(module, {n: rows.stacks[k][j] for n, k in keys.items()}, (part,))
                          for j, part in enumerate(parts)])
    return forward


@dataclass
class _PackedModel:
    """The LoRA layers and heads of a model, and the adapter keys each one reads."""

    loaded: LoadedModel
    modules: list[tuple[torch.nn.Module, Callable[..., torch.Tensor]]] = field(default_factory=list)
    rows: _Rows | None = None

    @classmethod
    def of(cls, loaded: LoadedModel) -> _PackedModel:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        pack, covered = cls(loaded, rows=_Rows(loaded.device)), set()
        keys = set(loaded.init_state)
        for name, module in loaded.model.named_modules():
            if isinstance(module, LoraLayer):
                where = f"the LoRA layer '{name}' ({type(module).__name__})"
                if not isinstance(module, LoraLinear):
                    raise ValueError(f"{where} is not a linear layer; packing stacks LoRA on linear layers only. "
                                     "Set peft.target_modules to linear layers, or train.pack_users=1.")
                if list(module.active_adapters) != [ADAPTER] or module.merged or module.disable_adapters:
                    raise ValueError(f"{where} has active adapters {list(module.active_adapters)} (merged: "
                                     f"{module.merged}); packing needs the one adapter '{ADAPTER}', unmerged.")
                if module.use_dora.get(ADAPTER) or module.lora_bias.get(ADAPTER) or ADAPTER in module.lora_variant:
                    raise ValueError(f"{where} uses DoRA, a LoRA bias or another LoRA variant; packing needs vanilla LoRA")
                key_a, key_b = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
                if key_a not in keys or key_b not in keys:
                    raise ValueError(f"{where}: its weights {key_a} / {key_b} are not adapter keys of this model")
                pack.modules.append((module, _lora_forward(module, pack.rows, key_a, key_b)))
                covered |= {key_a, key_b}
            elif isinstance(module, ModulesToSaveWrapper):
                if list(module.active_adapters) != [ADAPTER] or module.disable_adapters:
                    raise ValueError(f"the head '{name}' has active adapters {list(module.active_adapters)}; "
                                     f"packing needs the one adapter '{ADAPTER}'")
                prefix = f"{name}.modules_to_save.{ADAPTER}."
                head = {n: prefix + n for n, _ in module.modules_to_save[ADAPTER].named_parameters()}
                missing = [k for k in head.values() if k not in keys]
                if missing:
                    raise ValueError(f"the head '{name}': its weight {missing[0]} is not an adapter key of this model")
                pack.modules.append((module, _head_forward(module, pack.rows, head)))
                covered |= set(head.values())
        left = [k for k in loaded.init_state if k not in covered]
        if left:
            raise ValueError(f"adapter key '{left[0]}' (of {len(left)}) is not in a LoRA linear layer or a "
                             "modules_to_save head, so it cannot pack; use train.pack_users=1")
        return pack

    @contextmanager
    def installed(self) -> Iterator[_Rows]:
        """While active, the model's LoRA layers and heads run packed (``rows`` says how)."""
        done: list[torch.nn.Module] = []
        try:
            for module, forward in self.modules:
                if "forward" in vars(module):
                    raise RuntimeError(f"{type(module).__name__} already has its forward replaced; packing would lose it")
                module.forward = forward
                done.append(module)
            yield self.rows
        finally:
            for module in done:
                del module.forward

    def user_values(self, state: State, trainable: Callable[[str], bool] | None) -> dict[str, torch.Tensor]:
        """One user's adapter tensors on the model's device and dtypes: fresh leaves that train
        for the keys where ``trainable`` holds, constants elsewhere."""
        params = self.loaded.parameters_by_name()
        missing = [k for k in self.loaded.init_state if k not in state]
        unknown = [k for k in state if k not in self.loaded.init_state]
        if missing or unknown:
            what = f"lacks '{missing[0]}'" if missing else f"has '{unknown[0]}', not a key of this model's adapter"
            raise KeyError(f"A packed user's adapter state {what}; give each user's full composed state "
                           "(fedpeft.learning.models.composed_state)")
        values = {}
        for key in self.loaded.init_state:
            value = state[key].to(self.loaded.device, params[key].dtype)
            if trainable is not None and trainable(key):
                value = value.detach().clone().requires_grad_(True)
            values[key] = value
        return values


# ---- training --------------------------------------------------------------------------------------

@dataclass
class PackedOutcome:
    """One user's outcome: its trained adapter state (every adapter key, on the CPU, as
    ``models.adapter_state`` gives it) and ``train_user``'s result dict, or the error that failed
    this user alone (:class:`TrainingDiverged`, a ``ValueError`` about its data). ``processed``:
    examples forward+backward over all passes (:func:`train_strategy_packed`)."""

    state: State | None
    result: dict[str, float] | None
    error: Exception | None = None
    processed: float = 0.0


@dataclass
class _UserRun:
    examples: list[Example]
    values: dict[str, torch.Tensor]
    lr: float
    total: int = 0
    batches: Iterator[list[int]] | None = None
    leaves: list[torch.Tensor] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    prox: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    mu: float = 0.0
    losses: list[float] = field(default_factory=list)
    processed: int = 0
    error: Exception | None = None


def _per_user(value: Any, k: int, what: str) -> list[Any]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * k
    if len(values) != k:
        raise ValueError(f"{what}: got {len(values)} values for {k} users; give one per user (or one for all)")
    return values


def _packed_losses(loaded: LoadedModel, examples: list[Example], rows: _Rows, task: TaskSpec, config: Config,
                   tokens: CallTokens) -> list[torch.Tensor]:
    """Each active user's mean loss on its rows of one packed forward pass, computed as the
    per-user path computes it (encoder: :func:`encoder_loss_of_logits`; seq2seq: T5's token-mean
    cross-entropy on the logits; causal: the backbone's own ``loss_function``)."""
    parts = rows.split(torch.arange(len(examples)))
    if loaded.kind == "encoder":
        logits = loaded.model(**tokens.batch(examples)).logits.float()
        return [encoder_loss_of_logits(logits[p], [examples[i] for i in p.tolist()], task) for p in parts]
    batch = text_to_text_batch(loaded, examples, task, config, tokens)
    labels = batch.pop("labels")
    base = loaded.model.get_base_model()
    if loaded.kind == "seq2seq":
        logits = loaded.model(**batch, decoder_input_ids=base.prepare_decoder_input_ids_from_labels(labels=labels)).logits
        return [torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100)
                for lg, lb in zip(rows.split(logits), rows.split(labels))]
    logits = loaded.model(**batch).logits
    return [base.loss_function(lg, lb, vocab_size=base.config.vocab_size)
            for lg, lb in zip(rows.split(logits), rows.split(labels))]


def train_packed(
    loaded: LoadedModel,
    states: Sequence[State],
    users_train: Sequence[list[Example]],
    task: TaskSpec,
    config: Config,
    seeds: Sequence[int],
    *,
    trainable: Callable[[str], bool] = lambda key: True,
    epochs: int | None = None,
    lrs: float | Sequence[float | None] | None = None,
    anchors: State | Sequence[State | None] | None = None,
    mu: float = 0.0,
) -> list[PackedOutcome]:
    """Train k users together; user u's outcome equals ``compose_user_model(loaded, states[u])``
    then ``train_user(loaded, users_train[u], task, config, seeds[u], trainable=trainable,
    epochs=epochs, lr=lrs[u], anchor=anchors[u], mu=mu)`` then ``adapter_state(loaded)``.

    ``states``: each user's full composed adapter state (:func:`fedpeft.learning.models.composed_state`).
    ``lrs`` / ``anchors``: one per user, or one for all. A user's own failure (no examples, an
    unknown label, divergence) is its outcome's ``error``; the others go on. The model's adapter
    weights are left as they were.
    """
    if batch_listeners_active():
        raise ValueError("a batch listener is active (feddpa's per-input mixing): packed training does not call it")
    k = len(states)
    if not (len(users_train) == len(seeds) == k):
        raise ValueError(f"train_packed: {k} states, {len(users_train)} training sets, {len(seeds)} seeds; give one of each per user")
    lrs, anchors = _per_user(lrs, k, "lrs"), _per_user(anchors, k, "anchors")
    if config.peft.method in NO_TRAINING:
        return [PackedOutcome(dict(state), untrained_result()) for state in states]
    pack = _PackedModel.of(loaded)
    outcomes: list[PackedOutcome | None] = [None] * k
    tr = config.train
    runs: dict[int, _UserRun] = {}
    for u in range(k):
        try:
            check_training_examples(loaded, users_train[u], task)
        except ValueError as err:
            outcomes[u] = PackedOutcome(None, None, err)
            continue
        run = _UserRun(users_train[u], pack.user_values(states[u], trainable), lrs[u] or tr.lr)
        run.leaves = [v for v in run.values.values() if v.requires_grad]
        if not run.leaves:
            outcomes[u] = PackedOutcome(_cpu_state(run.values), untrained_result())
            continue
        run.total = step_budget(len(run.examples), config, epochs)
        run.batches = batch_order(np.random.default_rng(seeds[u]), len(run.examples), tr.batch_size)
        run.optimizer = torch.optim.AdamW(run.leaves, lr=run.lr, weight_decay=tr.weight_decay)
        if mu > 0:
            run.mu = mu
            run.prox = [(run.values[key], v.to(loaded.device)) for key, v in (anchors[u] or {}).items()
                        if key in run.values and run.values[key].requires_grad]
        runs[u] = run
    if runs:
        seed_torch(loaded, seeds[min(runs)])
        _train_steps(loaded, pack, list(runs.values()), task, config, CallTokens(loaded, config))
    for u, run in runs.items():
        if run.error is None:
            try:
                check_finite_weights(run.leaves, run.total, run.lr)
            except TrainingDiverged as err:
                run.error = err
        outcomes[u] = (PackedOutcome(None, None, run.error) if run.error is not None else
                       PackedOutcome(_cpu_state(run.values), train_result(run.losses, run.total, run.processed)))
    return outcomes  # type: ignore[return-value]


def _train_steps(loaded: LoadedModel, pack: _PackedModel, runs: list[_UserRun], task: TaskSpec, config: Config,
                 tokens: CallTokens) -> None:
    """The lock-step loop: at step s, every user with s <= its budget and no error sends a batch."""
    loaded.model.train()
    try:
        with pack.installed() as rows:
            for step in range(1, max(r.total for r in runs) + 1):
                active = [r for r in runs if r.error is None and step <= r.total]
                if not active:
                    break
                batches = [next(r.batches) for r in active]  # type: ignore[arg-type]
                for run, idx in zip(active, batches):
                    run.processed += len(idx)
                rows.set([r.values for r in active], [len(idx) for idx in batches])
                examples = [r.examples[i] for r, idx in zip(active, batches) for i in idx]
                losses = _packed_losses(loaded, examples, rows, task, config, tokens)
                total, live = None, []
                for run, loss, value in zip(active, losses, torch.stack([x.detach() for x in losses]).tolist()):
                    run.losses.append(value)
                    try:
                        check_step_loss(value, step, run.lr)
                    except TrainingDiverged as err:
                        run.error = err
                        continue
                    if run.prox:
                        loss = loss + proximal_term(run.prox, run.mu)
                    total = loss if total is None else total + loss
                    live.append(run)
                for run in live:
                    run.optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
                if total is not None:
                    total.backward()
                for run in live:
                    run.optimizer.step()  # type: ignore[union-attr]
    finally:
        loaded.model.eval()


def _cpu_state(values: dict[str, torch.Tensor]) -> State:
    return {k: v.detach().clone().cpu() for k, v in values.items()}


TrainFn = Callable[..., dict[str, float]]


def train_strategy_packed(
    local_train: Callable[[TrainFn], dict[str, float]],
    loaded: LoadedModel,
    states: Sequence[State],
    users_train: Sequence[list[Example]],
    task: TaskSpec,
    config: Config,
    seeds: Sequence[int],
    *,
    lrs: float | Sequence[float | None] | None = None,
    anchors: State | Sequence[State | None] | None = None,
    mu: float = 0.0,
) -> list[PackedOutcome]:
    """A strategy's local work for k users at once: ``local_train(train)`` is the strategy's
    ``lambda train: strategy.local_train(train, phase)``, which the per-user client calls with
    its ``train(trainable=..., epochs=...)`` closure.

    It is called once to record its sequence of ``train`` calls (fedrep: head epochs, then body),
    which must not depend on what they return; each call then runs packed for all users still
    alive, a user's next call starting from its state after the last; finally ``local_train``
    runs once per user on that user's recorded results, so its statistics are built by the
    strategy's own code. ``result`` is that dict; ``processed`` the examples of all passes.
    """
    calls: list[tuple[Callable[[str], bool], int | None]] = []

    def record(trainable: Callable[[str], bool] = lambda key: True, epochs: int | None = None) -> dict[str, float]:
        calls.append((trainable, epochs))
        return untrained_result()

    local_train(record)
    k = len(states)
    lrs, anchors = _per_user(lrs, k, "lrs"), _per_user(anchors, k, "anchors")
    current, results = list(states), [[] for _ in range(k)]
    errors: list[Exception | None] = [None] * k
    for trainable, epochs in calls:
        alive = [u for u in range(k) if errors[u] is None]
        if not alive:
            break
        outs = train_packed(loaded, [current[u] for u in alive], [users_train[u] for u in alive], task, config,
                            [seeds[u] for u in alive], trainable=trainable, epochs=epochs,
                            lrs=[lrs[u] for u in alive], anchors=[anchors[u] for u in alive], mu=mu)
        for u, out in zip(alive, outs):
            if out.error is not None:
                errors[u] = out.error
                continue
            if out.state is not None:
                current[u] = out.state
            results[u].append(out.result)
    outcomes = []
    for u in range(k):
        if errors[u] is not None:
            outcomes.append(PackedOutcome(None, None, errors[u]))
            continue
        replies = iter(results[u])
        stats = local_train(lambda trainable=None, epochs=None, _r=replies: next(_r))
        outcomes.append(PackedOutcome(current[u], stats, None, float(sum(r["examples"] for r in results[u]))))
    return outcomes


# ---- prediction ------------------------------------------------------------------------------------

@torch.no_grad()
def predict_packed(loaded: LoadedModel, states: Sequence[State], users_examples: Sequence[list[Example]],
                   task: TaskSpec, config: Config) -> list[list[str]]:
    """Each user's predictions on its examples, equal to ``compose_user_model(loaded, states[u])``
    then :func:`fedpeft.learning.training.predict` (no few-shot demonstrations). Users' chunks of
    ``train.eval_batch_size`` examples go through the model together: chunk c of every user with
    one, in one forward pass (encoder) or one greedy ``generate`` (seq2seq, causal: rows decode
    independently, so a row's tokens do not depend on its neighbours beyond float tolerance)."""
    if batch_listeners_active():
        raise ValueError("a batch listener is active (feddpa's per-input mixing): packed prediction does not call it")
    if len(states) != len(users_examples):
        raise ValueError(f"predict_packed: {len(states)} states for {len(users_examples)} users' examples")
    pack = _PackedModel.of(loaded)
    values = [pack.user_values(state, None) for state in states]
    if loaded.model.training:
        loaded.model.eval()
    bs = config.train.eval_batch_size
    chunks = [[examples[s : s + bs] for s in range(0, len(examples), bs)] for examples in users_examples]
    out: list[list[str]] = [[] for _ in states]
    tokens = CallTokens(loaded, config)
    with pack.installed() as rows:
        for c in range(max((len(ch) for ch in chunks), default=0)):
            active = [u for u in range(len(states)) if c < len(chunks[u])]
            rows.set([values[u] for u in active], [len(chunks[u][c]) for u in active])
            batch = tokens.batch([ex for u in active for ex in chunks[u][c]])
            preds = predict_batch(loaded, batch, task, config)
            start = 0
            for u in active:
                out[u] += preds[start : start + len(chunks[u][c])]
                start += len(chunks[u][c])
    return out
