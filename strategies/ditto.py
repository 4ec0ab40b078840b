"""ditto: a global adapter trained by FedAvg, and per user a personal adapter pulled towards it.

Ditto (Li, Hu, Beirami, Smith, ICML 2021), Algorithm 1, on adapters. Two LoRA adapters sit on the
same backbone, only one of them active at a time: ``global`` (w, shared, aggregated by the
server's FedAvg or any ``federation.server_optimizer``) and ``default`` (v, the user's personal
adapter, private, with the task head). Each round a sampled user

1. trains w from the w^t it received, with the personal adapter off (its local steps, as any
   FedAvg client: ``train.steps`` / ``train.epochs``, FedProx's anchor when configured), and
   sends it to the server;
2. trains v and the head with the global adapter off, minimising its loss plus
   ``strategy.ditto_lambda``/2 ||v - w^t||^2 towards the w^t it RECEIVED this round (not its own
   updated w), for ``strategy.ditto_personal_epochs`` epochs (0: the same budget as step 1).

The personal model (v and the head, global adapter off) is what is scored and exported.
v^0 = w^0 as in the paper's code: the server's first w is a copy of the personal adapter's common
initialisation (:meth:`Ditto.pretrain`), so with ``ditto_lambda=0`` v is exactly local_only's
adapter. Departure from the paper: Ditto duplicates the whole model, head included; here the
classification head (encoder backbones only; seq2seq and causal ones have none) is the user's,
trained in step 2 only and used frozen by step 1, so the global update is the global adapter alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Phase, Strategy

PERSONAL, GLOBAL = "default", "global"


def global_key(personal_key: str) -> str:
    return personal_key.replace(f".{PERSONAL}.", f".{GLOBAL}.")


def personal_key(global_key_: str) -> str:
    return global_key_.replace(f".{GLOBAL}.", f".{PERSONAL}.")


def activate(loaded: Any, adapter: str) -> None:
    """Make ``adapter`` the only active LoRA adapter of every LoRA layer (the head is untouched)."""
    from peft.tuners.lora import LoraLayer

    for module in loaded.model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter([adapter])


@register_strategy
class Ditto(Strategy):
    name = "ditto"
    description = "global adapter shared (FedAvg); personal adapter + head private, pulled towards the global one by lambda"
    extra_adapters = (GLOBAL,)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._loaded: Any = None

    def is_shared(self, key: str, phase: str) -> bool:
        return f".{GLOBAL}." in key

    def incompatibility(self, keys: list[str]) -> str | None:
        return self.needs_lora(keys, "ditto keeps a personal LoRA adapter beside a global one")

    def pretrain(self, loaded: Any, load_users: Callable[[], list[Any]], task: Any) -> dict[str, float] | None:
        """No central training: the global adapter starts as a copy of the personal adapter's
        common initialisation (v^0 = w^0), which becomes the server's first shared part."""
        params = loaded.parameters_by_name()
        with torch.no_grad():
            for key in loaded.init_state:
                if self.is_shared(key, "federated"):
                    params[key].copy_(params[personal_key(key)])
        return None

    def configure_model(self, loaded: Any, phase: str) -> None:
        """The personal model: personal adapter on, global adapter off (scoring and export)."""
        activate(loaded, PERSONAL)
        self._loaded = loaded

    def local_train(self, train: Callable[..., dict[str, float]], phase: Phase) -> dict[str, float]:
        if self._loaded is None:
            raise RuntimeError("ditto: configure_model(loaded, phase) must run before local_train")
        params = self._loaded.parameters_by_name()
        received = {k: params[k].detach().clone() for k in self._loaded.init_state if self.is_shared(k, phase.name)}
        try:
            activate(self._loaded, GLOBAL)
            glob = train(trainable=lambda k: self.is_shared(k, phase.name), epochs=phase.epochs)
        finally:
            activate(self._loaded, PERSONAL)
        lam = self.config.strategy.ditto_lambda
        anchor = {personal_key(k): v for k, v in received.items()} if lam > 0 else None
        personal = train(trainable=lambda k: not self.is_shared(k, phase.name),
                         epochs=self.config.strategy.ditto_personal_epochs or phase.epochs, anchor=anchor, mu=lam)
        return {"train_loss": personal["train_loss"], "global_loss": glob["train_loss"],
                "steps": glob["steps"] + personal["steps"]}
