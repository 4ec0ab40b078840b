"""fedavg: the whole adapter and head are shared (FedIT / Shepherd): the non-personalised baseline."""

from __future__ import annotations

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Strategy


@register_strategy
class FedAvgAll(Strategy):
    name = "fedavg"
    description = "whole adapter + head shared and aggregated; nothing private"

    def is_shared(self, key: str, phase: str) -> bool:
        return True
