"""What the model reads: each example's text, its tokens, and the padded batches of a call.

:func:`model_text` fits an example's history (and, for few-shot prediction, the demonstrations of
:func:`few_shot_demo`) before its question within ``input_length(config)`` tokens, once per text
(the lru-cached ``_fitted_text``). :class:`CallTokens` tokenizes each example once per call of
``train_user`` / ``predict`` (:mod:`fedpeft.learning.training`) or of the packed trainer, and pads
a batch's rows as the tokenizer would; :func:`text_to_text_batch` adds a generative backbone's
training targets (:func:`target_text`) with the loss on the answer tokens only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec, input_length
from fedpeft.data.retrieval import Layout, fit_prompt, with_history
from fedpeft.learning.models import LoadedModel


def target_text(example: Example, task: TaskSpec) -> str:
    return ", ".join(example.labels) if task.kind == "multilabel" else example.labels[0]


def few_shot_demo(shot: Example, task: TaskSpec) -> str:
    """One of the user's own training examples with its answer, as PEFT-U's few-shot baseline."""
    return f"{shot.text}\nAnswer: {target_text(shot, task)}\n\n"


def few_shot_layout(n_history: int) -> Layout:
    """The few-shot prompt: demonstrations, then the example (its history, the question), then
    'Answer:'; the kept pieces are the first ``n_history`` history items, then demonstrations."""
    def layout(question: str, kept: list[str]) -> str:
        return "".join(kept[n_history:]) + with_history(question, kept[:n_history]) + "\nAnswer:"
    return layout


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
    """Each example's tokens, computed once per call of ``train_user`` or ``predict``
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
