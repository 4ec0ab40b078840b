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

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec, input_length
from fedpeft.data.retrieval import Layout, fit_prompt, with_history
from fedpeft.learning.models import LoadedModel, set_trainable
from fedpeft.learning.peft_methods import NO_TRAINING
from fedpeft.learning.scoring import peft_u_parse


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


# ---- batches ---------------------------------------------------------------------------------

def target_text(example: Example, task: TaskSpec) -> str:
    return ", ".join(example.labels) if task.kind == "multilabel" else example.labels[0]


def _check_labels(task: TaskSpec, examples: list[Example]) -> None:
    if not task.labels:
        return
    known = set(task.labels)
    bad = next(((ex.id, lab) for ex in examples for lab in ex.labels if lab not in known), None)
    if bad:
        raise ValueError(f"Example '{bad[0]}' has label '{bad[1]}', not in the task's labels {list(task.labels)}")


def _token_counter(tokenizer: Any, kind: str) -> Callable[[str], int]:
    """Tokens the model reads for a text, counted as :meth:`CallTokens.inputs` tokenizes it."""
    if kind == "causal":  # a causal prompt is the text and a newline, without special tokens
        return lambda text: len(tokenizer(text + "\n", add_special_tokens=False)["input_ids"])
    extra = {} if kind == "encoder" else {"return_token_type_ids": False}
    return lambda text: len(tokenizer(text, **extra)["input_ids"])


def model_text(loaded: LoadedModel, example: Example, config: Config, demos: list[str] | None = None) -> str:
    """What the model reads for ``example``, built one way for training and prediction alike.

    The question (``example.text``) stays whole; its history items (and, for few-shot
    prediction, the ``demos``) go before it as far as ``input_length(config)`` tokens allow:
    :func:`fedpeft.data.retrieval.fit_prompt` cuts them first (and the question only when it is
    over the budget on its own). A causal backbone reads this text and a newline.
    """
    return _fitted_text(loaded.tokenizer, loaded.kind, input_length(config), example.text, example.history,
                        tuple(demos or ()))


@functools.lru_cache(maxsize=8192)  # an example is fitted once, not once per epoch
def _fitted_text(tokenizer: Any, kind: str, budget: int, question: str, history: tuple[str, ...],
                 demos: tuple[str, ...]) -> str:
    count = _token_counter(tokenizer, kind)
    if not demos:
        return fit_prompt(question, history, count, budget)
    pieces = [*history, *demos]  # the last demonstration is dropped first
    return fit_prompt(question, pieces, count, budget, few_shot_layout(len(history)))


class CallTokens:
    """Each example's tokens, computed once per call of :func:`train_user` or :func:`predict`
    (not once per batch of every epoch): the model's input ids as :func:`model_text` builds them
    (cut to ``input_length(config)``) and, for text-to-text training, the target's ids. A batch
    is these rows padded, which is exactly what tokenising the batch's texts together gives."""

    def __init__(self, loaded: LoadedModel, config: Config, demos: list[str] | None = None) -> None:
        self.loaded, self.config, self.demos = loaded, config, demos
        self.budget = input_length(config)  # once per call: it looks the benchmark up
        self._inputs: dict[int, dict[str, list[int]]] = {}
        self._targets: dict[tuple[int, str], list[int]] = {}

    def text(self, example: Example) -> str:
        return _fitted_text(self.loaded.tokenizer, self.loaded.kind, self.budget, example.text, example.history,
                            tuple(self.demos or ()))

    def inputs(self, example: Example) -> dict[str, list[int]]:
        """The example's input row (a causal prompt: the text and a newline, no special tokens)."""
        key = id(example)
        if key not in self._inputs:
            tok = self.loaded.tokenizer
            if self.loaded.kind == "causal":
                self._inputs[key] = {"input_ids": tok(self.text(example) + "\n", add_special_tokens=False)["input_ids"][: self.budget]}
            else:
                extra = {} if self.loaded.kind == "encoder" else {"return_token_type_ids": False}
                self._inputs[key] = dict(tok(self.text(example), truncation=True, max_length=self.budget, **extra))
        return self._inputs[key]

    def target(self, example: Example, text: str) -> list[int]:
        """A seq2seq target's ids, or a causal answer's (a space, the answer, no special tokens)."""
        key = (id(example), text)
        if key not in self._targets:
            tok, limit = self.loaded.tokenizer, self.config.model.max_new_tokens
            if self.loaded.kind == "seq2seq":
                self._targets[key] = tok(text_target=text, truncation=True, max_length=limit * 4)["input_ids"]
            else:
                self._targets[key] = tok(" " + text, add_special_tokens=False)["input_ids"][: limit - 1] + [tok.eos_token_id]
        return self._targets[key]

    def batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        """The model's input batch: right-padded as the tokenizer pads (its padding side), causal
        prompts left-padded for generation."""
        rows = [self.inputs(ex) for ex in examples]
        tok = self.loaded.tokenizer
        side = "left" if self.loaded.kind == "causal" else tok.padding_side
        pad = {"input_ids": tok.pad_token_id, "token_type_ids": tok.pad_token_type_id}
        width = max(len(r["input_ids"]) for r in rows)
        batch = {key: torch.tensor([_pad(r[key], width, pad.get(key, 0), side) for r in rows]) for key in rows[0]}
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.tensor([_pad([1] * len(r["input_ids"]), width, 0, side) for r in rows])
        return {k: v.to(self.loaded.device) for k, v in batch.items()}


def _pad(row: list[int], width: int, value: int, side: str) -> list[int]:
    fill = [value] * (width - len(row))
    return fill + row if side == "left" else row + fill


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


def text_to_text_batch(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config,
                       tokens: CallTokens | None = None) -> dict[str, torch.Tensor]:
    """The model's training inputs with ``labels`` (-100 where no loss is taken): seq2seq, the
    inputs and the target's ids; causal, prompt + answer + eos right-padded, labels on the answer."""
    tok, tokens = loaded.tokenizer, tokens or CallTokens(loaded, config)
    targets = [tokens.target(ex, target_text(ex, task)) for ex in examples]
    if loaded.kind == "seq2seq":
        width = max(len(t) for t in targets)
        labels = torch.tensor([_pad(t, width, tok.pad_token_id, tok.padding_side) for t in targets], device=loaded.device)
        labels[labels == tok.pad_token_id] = -100
        return {**tokens.batch(examples), "labels": labels}
    # causal: prompt + answer + eos, loss on the answer tokens only
    max_len = tokens.budget + config.model.max_new_tokens
    ids, labels = [], []
    for example, a in zip(examples, targets):
        p = tokens.inputs(example)["input_ids"]  # the same prompt tokens as predict's
        ids.append((p + a)[:max_len])
        labels.append(([-100] * len(p) + a)[:max_len])
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids], device=loaded.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=loaded.device)
    label_ids = torch.tensor([y + [-100] * (width - len(y)) for y in labels], device=loaded.device)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": label_ids}


def seed_torch(loaded: LoadedModel, seed: int) -> None:
    """Seed the generator the model draws from (dropout): on CPU the CPU generator alone, the
    same stream ``torch.manual_seed`` gives, without its lazy seeding of every accelerator
    backend (a measurable part of a client call); on an accelerator, everything."""
    if loaded.device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


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


def check_training_examples(loaded: LoadedModel, examples: list[Example], task: TaskSpec) -> None:
    """Refuse a user's examples that cannot train (none; generation on an encoder; unknown labels)."""
    if not examples:
        raise ValueError("this user has no training examples")
    if loaded.kind == "encoder" and task.kind == "generation":
        raise ValueError("generation tasks need a generative backbone (seq2seq or causal), not an encoder")
    _check_labels(task, examples)


def step_budget(n: int, config: Config, epochs: int | None) -> int:
    """Optimizer steps of one call on ``n`` examples (see :func:`train_user`)."""
    tr = config.train
    batches_per_epoch = max(1, -(-n // tr.batch_size))
    if epochs is not None:
        return epochs * batches_per_epoch
    return tr.steps if tr.steps > 0 else tr.epochs * batches_per_epoch


def batch_order(rng: np.random.Generator, n: int, batch_size: int) -> Iterator[list[int]]:
    """Each step's example indices: epochs of ``rng.permutation(n)`` cut into batches (the last
    batch of an epoch may be short), a new permutation drawn when the last one is used up."""
    order: list[int] = []
    while True:
        if not order:
            order = rng.permutation(n).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


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


def few_shot_demo(shot: Example, task: TaskSpec) -> str:
    """One of the user's own training examples with its answer, as PEFT-U's few-shot baseline."""
    return f"{shot.text}\nAnswer: {target_text(shot, task)}\n\n"


def few_shot_layout(n_history: int) -> Layout:
    """The few-shot prompt: demonstrations, then the example (its history, the question), then
    'Answer:'; the kept pieces are the first ``n_history`` history items, then demonstrations."""
    def layout(question: str, kept: list[str]) -> str:
        return "".join(kept[n_history:]) + with_history(question, kept[:n_history]) + "\nAnswer:"
    return layout


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
