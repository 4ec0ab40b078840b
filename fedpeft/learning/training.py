"""Local training and prediction for one user on the cached peft model.

Two paths, chosen by the backbone's kind:
- encoder: a classification head; cross-entropy over the task's labels (``classification`` and
  ``rating``), or per-label sigmoid (``multilabel``: the labels above 0.5, at least the top one,
  listed by decreasing logit, so the first is the most confident: the one the headline scores);
- seq2seq / causal (text-to-text): the target is the label text (multi-label joined by ", "),
  the rating, or the gold text; the loss covers the answer tokens only; predictions are greedy
  generations mapped back to labels leniently (multi-label: in the order generated, so the
  first valid label is the one the headline scores; see :mod:`fedpeft.learning.scoring`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec
from fedpeft.learning.inputs import CallTokens, few_shot_demo, text_to_text_batch
from fedpeft.learning.models import LoadedModel, set_trainable
from fedpeft.learning.peft_methods import NO_TRAINING
from fedpeft.learning.schedule import batch_order, seed_torch, step_budget
from fedpeft.learning.scoring import peft_u_parse

# ---- batch listeners -------------------------------------------------------------------------

BatchListener = Callable[[list[Example], list[int]], None]
_LISTENERS: ContextVar[tuple[BatchListener, ...]] = ContextVar("fedpeft_batch_listeners", default=())


@contextmanager
def batch_listener(listener: BatchListener) -> Iterator[None]:
    """While active, :func:`train_user` and :func:`predict` call ``listener(examples, rows)``
    before each forward pass: the examples they were given and the indices of this batch's rows,
    in row order (feddpa sets per-input mixing weights with it). A context rather than a keyword,
    so that it reaches through callers that do not pass keywords on (a strategy's ``local_train``
    gets the client's ``train`` closure); listeners nest and are all called, outermost first."""
    token = _LISTENERS.set((*_LISTENERS.get(), listener))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def batch_listeners_active() -> bool:
    """Whether a :func:`batch_listener` is active (the packed trainer refuses to run under one)."""
    return bool(_LISTENERS.get())


def announce_batch(examples: list[Example], rows: list[int]) -> None:
    for listener in _LISTENERS.get():
        listener(examples, rows)


# ---- losses ----------------------------------------------------------------------------------

def encoder_loss(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config,
                 tokens: CallTokens | None = None) -> torch.Tensor:
    logits = loaded.model(**(tokens or CallTokens(loaded, config)).batch(examples)).logits.float()
    return encoder_loss_of_logits(logits, examples, task)


def encoder_loss_of_logits(logits: torch.Tensor, examples: list[Example], task: TaskSpec) -> torch.Tensor:
    """The mean loss of a classification head's float logits, one row per example."""
    index = {label: i for i, label in enumerate(task.labels)}
    if task.kind == "multilabel":
        target = torch.zeros_like(logits)
        for row, ex in enumerate(examples):
            target[row, [index[lab] for lab in ex.labels]] = 1.0
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    target = torch.tensor([index[ex.labels[0]] for ex in examples], device=logits.device)
    return torch.nn.functional.cross_entropy(logits, target)


def text_to_text_loss(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config,
                      tokens: CallTokens | None = None) -> torch.Tensor:
    return loaded.model(**text_to_text_batch(loaded, examples, task, config, tokens)).loss


# ---- training ---------------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """A user's loss or trained adapter weights became non-finite (NaN or infinite). The client
    reports it as that user's failure for the round, before anything is stored: the user's stored
    adapter stays as the last good round left it."""


def is_divergence(reason: str) -> bool:
    """Whether a failed call's reason (the last line of the client's traceback, as
    ``failures.json`` records it) is a :class:`TrainingDiverged`."""
    return reason.startswith(f"{TrainingDiverged.__module__}.{TrainingDiverged.__qualname__}: training diverged")


def divergence_counts(failures: list[dict[str, Any]]) -> dict[str, int]:
    """Of a run's failed calls (``failures.json``'s records), the divergences: ``calls`` and the
    distinct ``users`` they were of."""
    diverged = [f for f in failures if is_divergence(f["error"])]
    return {"calls": len(diverged), "users": len({f["partition_id"] for f in diverged})}


def _diverged(what: str, lr: float, detail: str = "") -> TrainingDiverged:
    return TrainingDiverged(f"training diverged ({what}){detail}. Lower train.lr (this call used {lr:g}) or check "
                            "this user's data")


def check_finite_weights(params: list[torch.Tensor], step: int, lr: float) -> None:
    """One device sync for all trained parameters: are they all finite?"""
    with torch.no_grad():
        finite = torch.stack([torch.isfinite(p).all() for p in params]).all()
    if not bool(finite):
        raise _diverged(f"non-finite weights after step {step}", lr)


def _check_labels(task: TaskSpec, examples: list[Example]) -> None:
    if not task.labels:
        return
    known = set(task.labels)
    bad = next(((ex.id, lab) for ex in examples for lab in ex.labels if lab not in known), None)
    if bad:
        raise ValueError(f"Example '{bad[0]}' has label '{bad[1]}', not in the task's labels {list(task.labels)}")


def check_training_examples(loaded: LoadedModel, examples: list[Example], task: TaskSpec) -> None:
    """Refuse a user's examples that cannot train (none; generation on an encoder; unknown labels)."""
    if not examples:
        raise ValueError("this user has no training examples")
    if loaded.kind == "encoder" and task.kind == "generation":
        raise ValueError("generation tasks need a generative backbone (seq2seq or causal), not an encoder")
    _check_labels(task, examples)


def check_step_loss(value: float, step: int, lr: float) -> None:
    if not math.isfinite(value):
        raise _diverged(f"non-finite loss at step {step}", lr, f": the loss was {value}")


def proximal_term(prox: list[tuple[torch.Tensor, torch.Tensor]], mu: float) -> torch.Tensor:
    """FedProx's mu/2 * ||w - anchor||^2 over (weight, anchor) pairs."""
    return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in prox)


def untrained_result() -> dict[str, float]:
    """:func:`train_user`'s result when nothing trains (no trainable key, or a method that does not train)."""
    return {"train_loss": float("nan"), "steps": 0.0, "examples": 0.0}


def train_result(losses: list[float], total_steps: int, processed: int) -> dict[str, float]:
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(total_steps),
            "examples": float(processed)}


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

    The budget: ``epochs`` when given (a strategy's own epoch budget, e.g. fedrep's head epochs,
    fedavg_ft's fine-tune, pooled oppu's task epochs: always epochs); otherwise ``train.steps``
    steps when > 0, else ``train.epochs`` epochs. With ``mu`` > 0 a FedProx term
    mu/2 * ||w - anchor||^2 pulls the keys of ``anchor`` towards it. Returns the mean loss, the
    steps taken and ``examples``: examples processed (forward + backward), for compute accounting.
    A step's loss that is not finite, or a trained weight that is not at the end, raises
    :class:`TrainingDiverged`.
    """
    if config.peft.method in NO_TRAINING:
        return untrained_result()
    check_training_examples(loaded, examples, task)
    tr = config.train
    seed_torch(loaded, seed)
    rng = np.random.default_rng(seed)
    params = set_trainable(loaded, trainable)
    if not params:
        return untrained_result()
    lr = lr or tr.lr
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=tr.weight_decay)
    by_name = loaded.parameters_by_name()
    prox = [(by_name[k], v.to(loaded.device)) for k, v in (anchor or {}).items() if by_name[k].requires_grad] if mu > 0 else []
    loss_fn = encoder_loss if loaded.kind == "encoder" else text_to_text_loss
    tokens = CallTokens(loaded, config)
    total_steps = step_budget(len(examples), config, epochs)
    batches = batch_order(rng, len(examples), tr.batch_size)
    processed = 0
    loaded.model.train()
    losses: list[float] = []
    for step in range(1, total_steps + 1):
        idx = next(batches)
        processed += len(idx)
        announce_batch(examples, idx)
        loss = loss_fn(loaded, [examples[i] for i in idx], task, config, tokens)
        losses.append(float(loss.detach()))
        check_step_loss(losses[-1], step, lr)
        if prox:
            loss = loss + proximal_term(prox, mu)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loaded.model.eval()
    check_finite_weights(params, total_steps, lr)
    return train_result(losses, total_steps, processed)


# ---- prediction -------------------------------------------------------------------------------

def to_label(decoded: str, task: TaskSpec) -> str:
    """Map a generated answer back to the task's labels, leniently (PEFT-U's decoding)."""
    text = decoded.strip()
    if task.kind == "multilabel":
        return ", ".join(peft_u_parse(text, task.labels))
    if task.kind != "classification":
        return text  # ratings are parsed by the LaMP rule when scored; free text as it is
    clean = text.rstrip(" .!?;:,").strip()
    for label in task.labels:
        if clean.lower() == label.lower():
            return label
    containing = [label for label in task.labels if clean and clean.lower() in label.lower()]
    return containing[0] if len(containing) == 1 else clean


@torch.no_grad()
def predict(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config,
            shots: list[Example] | None = None) -> list[str]:
    """One prediction per example: a label, labels joined by ', ' (multilabel: most confident
    first), or text."""
    model = loaded.model
    if model.training:  # train_user leaves it in eval mode; switching walks every module
        model.eval()
    out: list[str] = []
    bs = config.train.eval_batch_size
    tokens = CallTokens(loaded, config, None if loaded.kind == "encoder" else [few_shot_demo(shot, task) for shot in shots or []])
    for start in range(0, len(examples), bs):
        chunk = examples[start : start + bs]
        announce_batch(examples, list(range(start, start + len(chunk))))
        out += predict_batch(loaded, tokens.batch(chunk), task, config)
    return out


def predict_batch(loaded: LoadedModel, batch: dict[str, torch.Tensor], task: TaskSpec, config: Config) -> list[str]:
    """One prediction per row of a model input batch (see :func:`predict`)."""
    model = loaded.model
    if loaded.kind == "encoder":
        logits = model(**batch).logits.float()
        if task.kind == "multilabel":
            ranked = logits.argsort(dim=-1, descending=True, stable=True).tolist()  # ties: label order
            chosen = [[i for i in order if row[i] > 0] or order[:1] for row, order in zip(logits.tolist(), ranked)]
            return [", ".join(task.labels[i] for i in ids) for ids in chosen]
        return [task.labels[i] for i in logits.argmax(-1).tolist()]
    generated = model.generate(**batch, max_new_tokens=config.model.max_new_tokens, do_sample=False, num_beams=1,
                               pad_token_id=loaded.tokenizer.pad_token_id)
    if loaded.kind == "causal":
        generated = generated[:, batch["input_ids"].shape[1]:]
    return [to_label(text, task) for text in loaded.tokenizer.batch_decode(generated, skip_special_tokens=True)]
