"""fedper: adapter keys of the lower layers shared, upper layers and head private.

FedPer / LG-FedAvg applied to adapters. The boundary is ``strategy.fedper_layers`` (adapter
keys of layers with a smaller index are shared) or, when set, the regex
``strategy.fedper_pattern`` (adapter keys matching it are shared).
"""

from __future__ import annotations

import re

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Strategy, is_head, layer_index


@register_strategy
class FedPer(Strategy):
    name = "fedper"
    description = "lower-layer adapter shared; upper layers and head private"

    def is_shared(self, key: str, phase: str) -> bool:
        if is_head(key):
            return False
        opts = self.config.strategy
        if opts.fedper_pattern:
            return re.search(opts.fedper_pattern, key) is not None
        index = layer_index(key)
        return index is not None and index < opts.fedper_layers

    def incompatibility(self, keys: list[str]) -> str | None:
        shared = [k for k in keys if self.is_shared(k, "federated")]
        body = [k for k in keys if not is_head(k)]
        if not shared:
            how = (f"strategy.fedper_pattern={self.config.strategy.fedper_pattern!r} matches no adapter key"
                   if self.config.strategy.fedper_pattern else
                   f"no adapter key has a layer index below strategy.fedper_layers={self.config.strategy.fedper_layers}")
            return how + f" (keys look like '{body[0] if body else keys[0]}')"
        if len(shared) == len(body):
            return "every adapter layer would be shared, leaving only the head private; lower strategy.fedper_layers or use fedrep"
        return None
