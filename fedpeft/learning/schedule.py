"""Seeds, learning rates and step budgets of a client call.

A call's seed depends only on the run seed, the user and the round (:func:`call_seed`); it seeds
the generator the model draws dropout from (:func:`seed_torch`) and the order of the user's
examples (:func:`batch_order`: epochs of permutations cut into batches). :func:`round_lr` is the
round's learning rate under ``train.lr_schedule`` and :func:`step_budget` the optimizer steps of
one call. The per-user trainer (:mod:`fedpeft.learning.training`) and the packed one
(:mod:`fedpeft.learning.packing`) both draw them from here, so a user's batches are the same either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.learning.models import LoadedModel


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


def seed_torch(loaded: LoadedModel, seed: int) -> None:
    """Seed the generator the model draws from (dropout): on CPU the CPU generator alone, the
    same stream ``torch.manual_seed`` gives, without its lazy seeding of every accelerator
    backend (a measurable part of a client call); on an accelerator, everything."""
    if loaded.device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def step_budget(n: int, config: Config, epochs: int | None) -> int:
    """Optimizer steps of one call on ``n`` examples (see :func:`fedpeft.learning.training.train_user`)."""
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


def examples_of_steps(n: int, steps: int, batch_size: int) -> int:
    """Examples ``steps`` batches of :func:`batch_order` hold on ``n`` examples: epochs cut into
    batches of ``batch_size``, the last batch of an epoch short."""
    if n <= 0:
        return 0
    epoch = [min(batch_size, n - i) for i in range(0, n, batch_size)]
    full, rest = divmod(steps, len(epoch))
    return full * n + sum(epoch[:rest])


def steps_within(n: int, examples: float, batch_size: int, most: int) -> int:
    """The most steps (at most ``most``) whose batches hold no more than ``examples`` examples."""
    steps = 0
    while steps < most and examples_of_steps(n, steps + 1, batch_size) <= examples:
        steps += 1
    return steps


def examples_per_call(n: int, config: Config) -> int:
    """Training examples one plain local call processes on ``n`` examples: ``train.steps`` batches
    (or ``train.epochs`` epochs) of :func:`batch_order`."""
    return examples_of_steps(n, step_budget(n, config, None), config.train.batch_size)
