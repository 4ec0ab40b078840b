"""fedsa: LoRA A matrices shared, B matrices and head private (FedSA-LoRA, ICLR'25).

A learns general knowledge and is aggregated; B captures the user-specific part and stays home.
"""

from __future__ import annotations

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Strategy, is_lora_a


@register_strategy
class FedSA(Strategy):
    name = "fedsa"
    description = "LoRA A shared; LoRA B and head private"

    def is_shared(self, key: str, phase: str) -> bool:
        return is_lora_a(key)

    def incompatibility(self, keys: list[str]) -> str | None:
        return self.needs_lora(keys, "the adapter has no LoRA A/B matrices to split")
