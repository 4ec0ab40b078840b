"""fedrep: body adapter shared, head private, trained in alternation (FedRep, Collins et al. 2021).

Each round a client first trains its private head for ``strategy.fedrep_head_epochs`` epochs
with the body frozen, then the shared body adapter for ``train.epochs`` with the head frozen.
"""

from __future__ import annotations

from collections.abc import Callable

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Phase, Strategy, is_head


@register_strategy
class FedRep(Strategy):
    name = "fedrep"
    description = "body adapter shared, head private; head then body each round"

    def is_shared(self, key: str, phase: str) -> bool:
        return not is_head(key)

    def incompatibility(self, keys: list[str]) -> str | None:
        if not any(is_head(k) for k in keys):
            return "the adapter has no trainable task head (classifier/score) to keep private"
        return None

    def local_train(self, train: Callable[..., dict[str, float]], phase: Phase) -> dict[str, float]:
        head = train(trainable=is_head, epochs=self.config.strategy.fedrep_head_epochs)
        body = train(trainable=lambda k: not is_head(k), epochs=phase.epochs)
        return {"train_loss": body["train_loss"], "head_loss": head["train_loss"], "steps": head["steps"] + body["steps"]}
