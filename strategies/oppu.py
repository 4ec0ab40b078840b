"""oppu: a task adapter trained first on all users, then frozen, with a personal adapter on top.

One PEFT Per User (Tan et al. 2024). Phase "task": the ``default`` LoRA adapter and the head are
trained on every user's data, either federated (fedavg rounds, ``strategy.oppu_task_mode=federated``)
or pooled centrally as in the paper (``pooled``: ``strategy.oppu_task_rounds`` epochs over the union
of the users' training sets, in the driver before the simulation). Phase "personal": the task
adapter is frozen (equivalent to merged) and each user trains its own ``personal`` LoRA adapter
and head, which stay private. Each user trains on its own data only (the published code's
accumulation of earlier users' data into later users' training sets is not reproduced).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Phase, Strategy, is_head

TASK, PERSONAL = "default", "personal"


@register_strategy
class OPPU(Strategy):
    name = "oppu"
    description = "task adapter (federated or pooled) frozen, personal adapter + head private"
    extra_adapters = (PERSONAL,)

    def phases(self) -> list[Phase]:
        personal = Phase("personal", self.config.federation.rounds)
        if self.config.strategy.oppu_task_mode == "pooled":
            return [personal]
        return [Phase("task", self.config.strategy.oppu_task_rounds), personal]

    def is_shared(self, key: str, phase: str) -> bool:
        return phase == "task" and (f".{TASK}." in key)

    def is_frozen(self, key: str, phase: str) -> bool:
        if phase == "task":
            return f".{PERSONAL}." in key
        return f".{TASK}." in key and not is_head(key)

    def shared_keys(self, keys: list[str]) -> list[str]:
        """The task adapter and head travel down in every phase (in 'pooled' mode too)."""
        return [k for k in keys if self.is_shared(k, "task")]

    def incompatibility(self, keys: list[str]) -> str | None:
        return self.needs_lora(keys, "oppu stacks a personal LoRA adapter on a task LoRA adapter")

    def pretrain(self, loaded: Any, load_users: Callable[[], list[Any]], task: Any) -> dict[str, float] | None:
        """Pooled mode: train the task adapter and head on all users' training data at once."""
        from fedpeft.learning.training import train_user

        if self.config.strategy.oppu_task_mode != "pooled":
            return None
        pooled = [ex for user in load_users() for ex in user.train]
        return train_user(loaded, pooled, task, self.config, seed=self.config.seed,
                          trainable=lambda k: not self.is_frozen(k, "task"), epochs=self.config.strategy.oppu_task_rounds)
