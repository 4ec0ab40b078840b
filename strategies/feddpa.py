"""feddpa: a global adapter (shared) and a local adapter (private), mixed (FedDPA, NeurIPS'24).

Two LoRA adapters sit on the same backbone: ``default`` is global and aggregated, ``local`` is
the user's own; the task head is private. Each round a client trains the global adapter (local
frozen), then its local adapter (global frozen), as FedDPA-T does. Their outputs are mixed with
weight ``lambda`` for the local one and ``1 - lambda`` for the global one (scaled so that 0.5
is the plain sum): ``strategy.feddpa_mix`` when ``strategy.feddpa_mode=fixed``; with
``per_input``, at test time each input gets lambda = its highest cosine similarity (clipped to
[0, 1]) to the user's training inputs, in the frozen backbone's mean-pooled embedding space —
FedDPA's instance-wise dynamic weighting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from strategies import register_strategy
from strategies.base import Phase, Strategy, is_head

GLOBAL, LOCAL = "default", "local"


def set_mix(loaded: Any, local_weight: float) -> None:
    """Scale the global and local LoRA adapters' contributions to 2(1-w) and 2w of their normal."""
    from peft.tuners.lora import LoraLayer

    base = loaded.model.peft_config[GLOBAL].lora_alpha / loaded.model.peft_config[GLOBAL].r
    for module in loaded.model.modules():
        if isinstance(module, LoraLayer):
            module.scaling[GLOBAL] = base * 2 * (1 - local_weight)
            module.scaling[LOCAL] = base * 2 * local_weight


@torch.no_grad()
def embed(loaded: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of the frozen backbone (adapters off)."""
    batch = loaded.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(loaded.device)
    with loaded.model.disable_adapter():
        hidden = loaded.model.base_model.model.base_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


@register_strategy
class FedDPA(Strategy):
    name = "feddpa"
    description = "global adapter shared + local adapter private, mixed per input or with a fixed weight"
    extra_adapters = (LOCAL,)

    def is_shared(self, key: str, phase: str) -> bool:
        return f".{GLOBAL}." in key and not is_head(key)

    def incompatibility(self, keys: list[str]) -> str | None:
        return self.needs_lora(keys, "feddpa mixes two LoRA adapters")

    def configure_model(self, loaded: Any, phase: str) -> None:
        set_mix(loaded, self.config.strategy.feddpa_mix)

    def local_train(self, train: Callable[..., dict[str, float]], phase: Phase) -> dict[str, float]:
        glob = train(trainable=lambda k: self.is_shared(k, phase.name) or is_head(k), epochs=phase.epochs)
        local = train(trainable=lambda k: f".{LOCAL}." in k or is_head(k), epochs=phase.epochs)
        return {"train_loss": local["train_loss"], "global_loss": glob["train_loss"], "steps": glob["steps"] + local["steps"]}

    def predict(self, loaded: Any, user: Any, task: Any) -> list[str]:
        if self.config.strategy.feddpa_mode == "fixed":
            return super().predict(loaded, user, task)
        from fedpeft.data import input_length
        from fedpeft.training import predict

        max_len = input_length(self.config)
        sims = embed(loaded, [ex.text for ex in user.test], max_len) @ embed(loaded, [ex.text for ex in user.train], max_len).T
        weights = sims.max(dim=1).values.clamp(0, 1).tolist()
        out = []
        for example, weight in zip(user.test, weights):
            set_mix(loaded, weight)
            out += predict(loaded, [example], task, self.config)
        self.configure_model(loaded, "")
        return out
