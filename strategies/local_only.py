"""local_only: every user trains its own adapter and head alone; nothing is shared.

This is One-PEFT-Per-User (OPPU) without its shared task adapter: the baseline that every
federated split is compared against. With no shared keys, a user's result is exactly what it
would get training alone with the same seed.
"""

from __future__ import annotations

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Strategy


@register_strategy
class LocalOnly(Strategy):
    name = "local_only"
    description = "nothing shared; each user's whole adapter and head stay private (OPPU-style)"

    def is_shared(self, key: str, phase: str) -> bool:
        return False
