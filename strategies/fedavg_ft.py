"""fedavg_ft: federated rounds on the whole adapter, then each user fine-tunes a private copy.

"FedAvg + fine-tune": phase 1 is fedavg for ``federation.rounds`` rounds; phase 2 is one round
in which every user starts from the global adapter and trains ``strategy.finetune_epochs``
epochs locally. The fine-tuned copy is private and is what the user is scored with.
"""

from __future__ import annotations

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Phase, Strategy


@register_strategy
class FedAvgFineTune(Strategy):
    name = "fedavg_ft"
    description = "fedavg rounds, then a private local fine-tune of the whole adapter"

    def phases(self) -> list[Phase]:
        return [Phase("federated", self.config.federation.rounds),
                Phase("finetune", 1, everyone=True, epochs=self.config.strategy.finetune_epochs)]

    def is_shared(self, key: str, phase: str) -> bool:
        return phase == "federated"
