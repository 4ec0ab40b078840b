"""Local training and prediction for one user on the cached peft model."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec
from fedpeft.models import LoadedModel, set_trainable


def call_seed(config: Config, user_index: int, server_round: int) -> int:
    """Seed of one client call: depends only on the run seed, the user and the round."""
    return int(np.random.default_rng([config.seed, 20, user_index, server_round]).integers(2**31 - 1))


def round_lr(config: Config, server_round: int, total_rounds: int) -> float:
    """The client learning rate of a round under ``train.lr_schedule``."""
    tr = config.train
    if tr.lr_schedule == "constant" or total_rounds <= 1:
        return tr.lr
    progress = (server_round - 1) / (total_rounds - 1)
    low = tr.lr * tr.lr_min_factor
    if tr.lr_schedule == "linear":
        return tr.lr + (low - tr.lr) * progress
    return low + (tr.lr - low) * 0.5 * (1 + math.cos(math.pi * progress))


def _encode(loaded: LoadedModel, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v.to(loaded.device) for k, v in batch.items()}


def _targets(task: TaskSpec, examples: list[Example]) -> torch.Tensor:
    index = {label: i for i, label in enumerate(task.labels)}
    missing = [(ex.id, lab) for ex in examples for lab in ex.labels if lab not in index]
    if missing:
        raise ValueError(f"Example '{missing[0][0]}' has label '{missing[0][1]}', not in the task's labels {list(task.labels)}")
    return torch.tensor([index[ex.labels[0]] for ex in examples])


def train_user(
    loaded: LoadedModel,
    examples: list[Example],
    task: TaskSpec,
    config: Config,
    seed: int,
    *,
    trainable: Callable[[str], bool] = lambda key: True,
    epochs: int | None = None,
    lr: float | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
    mu: float = 0.0,
) -> dict[str, float]:
    """Train the adapter keys for which ``trainable`` holds on ``examples``.

    ``epochs`` replaces ``train.epochs`` (``train.steps`` > 0 wins over both); with ``mu`` > 0
    a FedProx term mu/2 * ||w - anchor||^2 pulls the keys of ``anchor`` towards it.
    """
    if not examples:
        raise ValueError("this user has no training examples")
    if task.kind != "classification":
        raise ValueError(f"task kind '{task.kind}' is not supported by the encoder backbone yet")
    tr = config.train
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = loaded.model
    params = set_trainable(loaded, trainable)
    if not params:
        return {"train_loss": float("nan"), "steps": 0.0}
    optimizer = torch.optim.AdamW(params, lr=lr or tr.lr, weight_decay=tr.weight_decay)
    by_name = loaded.parameters_by_name()
    prox = [(by_name[k], v.to(loaded.device)) for k, v in (anchor or {}).items() if by_name[k].requires_grad] if mu > 0 else []
    targets = _targets(task, examples).to(loaded.device)
    n = len(examples)
    batches_per_epoch = max(1, -(-n // tr.batch_size))
    total_steps = tr.steps if tr.steps > 0 else (epochs or tr.epochs) * batches_per_epoch
    model.train()
    losses: list[float] = []
    order: list[int] = []
    for _ in range(total_steps):
        if not order:
            order = rng.permutation(n).tolist()
        idx, order = order[: tr.batch_size], order[tr.batch_size :]
        batch = _encode(loaded, [examples[i].text for i in idx], config.data.max_length)
        loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), targets[idx])
        losses.append(float(loss.detach()))
        if prox:
            loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in prox)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return {"train_loss": float(np.mean(losses)), "steps": float(total_steps)}


@torch.no_grad()
def predict(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config) -> list[str]:
    """The predicted label of each example (argmax over the task's labels)."""
    model = loaded.model
    model.eval()
    out: list[str] = []
    bs = config.train.eval_batch_size
    for start in range(0, len(examples), bs):
        batch = _encode(loaded, [ex.text for ex in examples[start : start + bs]], config.data.max_length)
        out += [task.labels[i] for i in model(**batch).logits.argmax(-1).tolist()]
    return out
