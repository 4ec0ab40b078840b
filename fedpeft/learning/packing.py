"""Packed training and prediction: k users' LoRA adapters in one forward pass (issue 20).

The packed layers are :mod:`fedpeft.learning.packed_lora`'s; what packs is
:mod:`fedpeft.learning.packable`'s business. This module runs k users' local training
(:func:`train_packed`, :func:`train_strategy_packed`) and prediction (:func:`predict_packed`)
through them.

Users stay independent: the loss is the sum of per-user mean losses (no gradient crosses users),
each user has its own leaf tensors and its own ``torch.optim.AdamW`` (so its own state, step
count and learning rate), its own seed, batch order (:func:`fedpeft.learning.schedule.batch_order`),
step budget, FedProx anchor and divergence checks, exactly as :func:`fedpeft.learning.training.train_user`
draws and does them. A user whose steps are done sends no rows and its optimizer does not step
(no update, no weight decay, no moment update). With dropout off (backbone and adapter), a
user's result equals ``compose_user_model`` + ``train_user`` up to float reassociation of the
batched matmuls; with dropout on, the draws differ (the packed step draws from one stream,
seeded with the first user's seed).

This module imports neither flwr nor ray (the GPU benchmark ``sims/pack_bench.py`` runs it with
torch, transformers and peft alone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec
from fedpeft.learning.inputs import CallTokens, text_to_text_batch
from fedpeft.learning.models import LoadedModel
from fedpeft.learning.packed_lora import PackedModel, PackedRows, State
from fedpeft.learning.peft_methods import NO_TRAINING
from fedpeft.learning.schedule import batch_order, seed_torch, step_budget
from fedpeft.learning.training import (
    TrainingDiverged,
    batch_listeners_active,
    check_finite_weights,
    check_step_loss,
    check_training_examples,
    encoder_loss_of_logits,
    predict_batch,
    proximal_term,
    train_result,
    untrained_result,
)

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


def _packed_losses(loaded: LoadedModel, examples: list[Example], rows: PackedRows, task: TaskSpec, config: Config,
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
    pack = PackedModel.of(loaded)
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


def _train_steps(loaded: LoadedModel, pack: PackedModel, runs: list[_UserRun], task: TaskSpec, config: Config,
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
    pack = PackedModel.of(loaded)
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
