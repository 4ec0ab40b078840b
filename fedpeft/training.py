"""Local training and prediction for one user on the cached peft model.

Two paths, chosen by the backbone's kind:
- encoder: a classification head; cross-entropy over the task's labels (``classification`` and
  ``rating``), or per-label sigmoid (``multilabel``: labels above 0.5, at least the top one);
- seq2seq / causal (text-to-text): the target is the label text (multi-label joined by ", "),
  the rating, or the gold text; the loss covers the answer tokens only; predictions are greedy
  generations mapped back to labels leniently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec, input_length
from fedpeft.models import LoadedModel, set_trainable
from fedpeft.peft_methods import NO_TRAINING
from fedpeft.scoring import peft_u_parse


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


def _encode(loaded: LoadedModel, texts: list[str], config: Config, **kwargs) -> dict[str, torch.Tensor]:
    extra = {} if loaded.kind == "encoder" else {"return_token_type_ids": False}
    batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=input_length(config),
                             return_tensors="pt", **extra, **kwargs)
    return {k: v.to(loaded.device) for k, v in batch.items()}


def encoder_loss(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config) -> torch.Tensor:
    logits = loaded.model(**_encode(loaded, [ex.text for ex in examples], config)).logits.float()
    index = {label: i for i, label in enumerate(task.labels)}
    if task.kind == "multilabel":
        target = torch.zeros_like(logits)
        for row, ex in enumerate(examples):
            target[row, [index[lab] for lab in ex.labels]] = 1.0
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    target = torch.tensor([index[ex.labels[0]] for ex in examples], device=logits.device)
    return torch.nn.functional.cross_entropy(logits, target)


def text_to_text_loss(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config) -> torch.Tensor:
    tok = loaded.tokenizer
    prompts = [ex.text for ex in examples]
    targets = [target_text(ex, task) for ex in examples]
    if loaded.kind == "seq2seq":
        batch = _encode(loaded, prompts, config)
        labels = tok(text_target=targets, padding=True, truncation=True, max_length=config.model.max_new_tokens * 4,
                     return_tensors="pt", return_token_type_ids=False)["input_ids"].to(loaded.device)
        labels[labels == tok.pad_token_id] = -100
        return loaded.model(**batch, labels=labels).loss
    # causal: prompt + answer + eos, loss on the answer tokens only
    max_len = input_length(config) + config.model.max_new_tokens
    ids, labels = [], []
    for prompt, target in zip(prompts, targets):
        p = tok(prompt + "\n", add_special_tokens=False)["input_ids"][-input_length(config):]
        a = tok(" " + target, add_special_tokens=False)["input_ids"][: config.model.max_new_tokens - 1] + [tok.eos_token_id]
        ids.append((p + a)[:max_len])
        labels.append(([-100] * len(p) + a)[:max_len])
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids], device=loaded.device)
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids], device=loaded.device)
    label_ids = torch.tensor([y + [-100] * (width - len(y)) for y in labels], device=loaded.device)
    return loaded.model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss


# ---- training ---------------------------------------------------------------------------------

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
    """
    if config.peft.method in NO_TRAINING:
        return {"train_loss": float("nan"), "steps": 0.0, "examples": 0.0}
    if not examples:
        raise ValueError("this user has no training examples")
    if loaded.kind == "encoder" and task.kind == "generation":
        raise ValueError("generation tasks need a generative backbone (seq2seq or causal), not an encoder")
    _check_labels(task, examples)
    tr = config.train
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = set_trainable(loaded, trainable)
    if not params:
        return {"train_loss": float("nan"), "steps": 0.0, "examples": 0.0}
    optimizer = torch.optim.AdamW(params, lr=lr or tr.lr, weight_decay=tr.weight_decay)
    by_name = loaded.parameters_by_name()
    prox = [(by_name[k], v.to(loaded.device)) for k, v in (anchor or {}).items() if by_name[k].requires_grad] if mu > 0 else []
    loss_fn = encoder_loss if loaded.kind == "encoder" else text_to_text_loss
    n = len(examples)
    batches_per_epoch = max(1, -(-n // tr.batch_size))
    if epochs is not None:
        total_steps = epochs * batches_per_epoch
    else:
        total_steps = tr.steps if tr.steps > 0 else tr.epochs * batches_per_epoch
    processed = 0
    loaded.model.train()
    losses: list[float] = []
    order: list[int] = []
    for _ in range(total_steps):
        if not order:
            order = rng.permutation(n).tolist()
        idx, order = order[: tr.batch_size], order[tr.batch_size :]
        processed += len(idx)
        loss = loss_fn(loaded, [examples[i] for i in idx], task, config)
        losses.append(float(loss.detach()))
        if prox:
            loss = loss + 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in prox)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loaded.model.eval()
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "steps": float(total_steps),
            "examples": float(processed)}


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


def few_shot_prompt(example: Example, shots: list[Example], task: TaskSpec) -> str:
    """k of the user's own training examples before the input, as PEFT-U's few-shot baseline."""
    demos = "".join(f"{shot.text}\nAnswer: {target_text(shot, task)}\n\n" for shot in shots)
    return f"{demos}{example.text}\nAnswer:"


@torch.no_grad()
def predict(loaded: LoadedModel, examples: list[Example], task: TaskSpec, config: Config,
            shots: list[Example] | None = None) -> list[str]:
    """One prediction per example: a label, labels joined by ', ' (multilabel), or text."""
    model = loaded.model
    model.eval()
    out: list[str] = []
    bs = config.train.eval_batch_size
    for start in range(0, len(examples), bs):
        chunk = examples[start : start + bs]
        if loaded.kind == "encoder":
            logits = model(**_encode(loaded, [ex.text for ex in chunk], config)).logits.float()
            if task.kind == "multilabel":
                chosen = [(row > 0).nonzero().flatten().tolist() or [int(row.argmax())] for row in logits]
                out += [", ".join(task.labels[i] for i in ids) for ids in chosen]
            else:
                out += [task.labels[i] for i in logits.argmax(-1).tolist()]
            continue
        prompts = [few_shot_prompt(ex, shots, task) if shots else ex.text for ex in chunk]
        if loaded.kind == "causal":
            prompts = [p + "\n" for p in prompts]
        batch = _encode(loaded, prompts, config)
        generated = model.generate(**batch, max_new_tokens=config.model.max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=loaded.tokenizer.pad_token_id)
        if loaded.kind == "causal":
            generated = generated[:, batch["input_ids"].shape[1]:]
        out += [to_label(text, task) for text in loaded.tokenizer.batch_decode(generated, skip_special_tokens=True)]
    return out
