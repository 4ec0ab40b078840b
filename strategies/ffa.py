"""ffa: LoRA A frozen at the same initialisation for every user, B shared, head private (FFA-LoRA, ICLR'24).

Freezing A makes the aggregate of B exact (the mean of products equals the product of means).
A never trains and never travels: every user rebuilds it from the common seed.
"""

from __future__ import annotations

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Strategy, is_lora_a, is_lora_b


@register_strategy
class FFA(Strategy):
    name = "ffa"
    description = "LoRA A frozen (common init), LoRA B shared, head private"

    def is_shared(self, key: str, phase: str) -> bool:
        return is_lora_b(key)

    def is_frozen(self, key: str, phase: str) -> bool:
        return is_lora_a(key)

    def incompatibility(self, keys: list[str]) -> str | None:
        return self.needs_lora(keys, "the adapter has no LoRA A matrix to freeze")
