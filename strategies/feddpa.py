"""feddpa: a global adapter (shared) and a local adapter (private), mixed (FedDPA, NeurIPS'24).

Two LoRA adapters sit on the same backbone: ``default`` is global and aggregated, ``local`` is
the user's own; the task head is private. Each round a client trains the global adapter (local
frozen), then its local adapter (global frozen), as FedDPA-T does. Their outputs are mixed with
weight ``2 lambda`` for the local one and ``2 (1 - lambda)`` for the global one (so 0.5 is the
plain sum), the same way in training and at test:

- ``strategy.feddpa_mode=fixed``: lambda = ``strategy.feddpa_mix`` for every input.
- ``per_input`` (FedDPA's instance-wise dynamic weighting): lambda(x) = feddpa_mix * s(x), where
  s(x) is the mean cosine similarity, clipped to [0, 1], of x to the user's training inputs other
  than x itself (those with another text; s = 1 when there are none), in the frozen backbone's
  embedding space: hidden states mean-pooled over real tokens, of the encoder (encoder and seq2seq
  backbones) or the decoder (causal). One function gives a training input its lambda (leave one
  out: its similarity to itself says nothing) and a test input its own, so a text is mixed the
  same way in training and at test. ``feddpa_mix`` is then the largest local weight, as the
  paper's maximum weight (0.5 in its code). Within a batch each row gets its own lambda, through
  forward hooks on the LoRA layers' B matrices (:class:`PerInputMix`).

The paper's code (Lydia-yang/FedDPA) trains at a fixed 0.5/0.5 mix and scores a test input at
0.5 x its mean similarity to 5 random training inputs, embedded as the last token's hidden state
with the local adapter on; fedpeft mixes training inputs per input too, compares with all the
user's training inputs (deterministic) and embeds with the frozen backbone (stable across rounds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fedpeft.config import ConfigError
from fedpeft.strategies import register_strategy
from fedpeft.strategies.base import Phase, Strategy, is_head

GLOBAL, LOCAL = "default", "local"
PER_INPUT_UNSUPPORTED = ("lora_magnitude_vector", "lora_embedding_")  # DoRA; LoRA on embedding layers


def set_mix(loaded: Any, local_weight: float) -> None:
    """Scale the global and local LoRA adapters' contributions to 2(1-w) and 2w of their normal."""
    from peft.tuners.lora import LoraLayer

    base = loaded.model.peft_config[GLOBAL].lora_alpha / loaded.model.peft_config[GLOBAL].r
    for module in loaded.model.modules():
        if isinstance(module, LoraLayer):
            module.scaling[GLOBAL] = base * 2 * (1 - local_weight)
            module.scaling[LOCAL] = base * 2 * local_weight


# ---- per-input weights ----------------------------------------------------------------------------

def _hidden_states(loaded: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Last hidden states of the backbone's input stack: the encoder (encoder and seq2seq
    backbones) or the decoder (causal)."""
    backbone = loaded.model.get_base_model()
    stack = backbone.get_encoder() if loaded.kind == "seq2seq" else backbone.base_model
    return stack(**batch).last_hidden_state


@torch.no_grad()
def embed(loaded: Any, texts: list[str], max_length: int, batch_size: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised embeddings of the frozen backbone (adapters off, eval mode).

    Padded on the right, so that with causal attention an input embeds the same in any batch."""
    extra = {} if loaded.kind == "encoder" else {"return_token_type_ids": False}
    was_training = loaded.model.training
    loaded.model.eval()
    pooled = []
    try:
        with loaded.model.disable_adapter():
            for start in range(0, len(texts), batch_size):
                batch = loaded.tokenizer(texts[start : start + batch_size], padding=True, truncation=True,
                                         max_length=max_length, padding_side="right", return_tensors="pt",
                                         **extra).to(loaded.device)
                hidden = _hidden_states(loaded, batch).float()
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    finally:
        loaded.model.train(was_training)
    return torch.cat(pooled) if pooled else torch.zeros(0, 1, device=loaded.device)


def similarity_to_others(queries: torch.Tensor, query_texts: list[str], references: torch.Tensor,
                         reference_texts: list[str]) -> torch.Tensor:
    """Per query: the mean cosine similarity (rows are unit vectors) to the references with
    another text, clipped to [0, 1]; 1 for a query with no such reference."""
    others = torch.tensor([[q != r for r in reference_texts] for q in query_texts], dtype=torch.bool,
                          device=queries.device).reshape(len(query_texts), len(reference_texts))
    sims = (queries @ references.T) if len(reference_texts) else torch.zeros_like(others, dtype=queries.dtype)
    count = others.sum(1)
    mean = (sims * others).sum(1) / count.clamp(min=1)
    return torch.where(count > 0, mean, torch.ones_like(mean)).clamp(0, 1)


def input_weights(loaded: Any, config: Any, queries: list[Any], references: list[Any]) -> torch.Tensor:
    """lambda of each query example: feddpa_mix x its similarity to the other reference examples
    (the user's training inputs)."""
    from fedpeft.data import input_length

    length, size = input_length(config), config.train.eval_batch_size
    query_texts, reference_texts = [ex.text for ex in queries], [ex.text for ex in references]
    query_emb = embed(loaded, query_texts, length, size)
    reference_emb = query_emb if queries is references else embed(loaded, reference_texts, length, size)
    return config.strategy.feddpa_mix * similarity_to_others(query_emb, query_texts, reference_emb, reference_texts)


class PerInputMix:
    """Inside ``with``, row i of every forward pass mixes the adapters with its own lambda_i, set
    by :meth:`use` before the pass: forward hooks scale each LoRA layer's B outputs by
    2(1-lambda_i) (global) and 2 lambda_i (local) on top of the plain-sum scalings, which equals
    :func:`set_mix` (lambda_i) row by row. Scalings and hooks are restored on exit."""

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.weights: torch.Tensor | None = None
        self._handles: list[Any] = []
        self._saved: list[tuple[Any, dict[str, float]]] = []

    def __enter__(self) -> PerInputMix:
        from peft.tuners.lora import LoraLayer

        layers = [m for m in self.loaded.model.modules() if isinstance(m, LoraLayer) and GLOBAL in m.lora_B]
        if not layers:
            raise RuntimeError("feddpa per_input found no LoRA layer with a 'default' adapter to weight")
        self._saved = [(m, dict(m.scaling)) for m in layers]
        set_mix(self.loaded, 0.5)
        for module in layers:
            self._handles.append(module.lora_B[GLOBAL].register_forward_hook(self._hook(lambda w: 2 * (1 - w))))
            self._handles.append(module.lora_B[LOCAL].register_forward_hook(self._hook(lambda w: 2 * w)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        for module, scaling in self._saved:
            module.scaling.update(scaling)
        self._handles, self._saved, self.weights = [], [], None

    def use(self, weights: torch.Tensor) -> None:
        """lambda of each row of the next forward passes."""
        self.weights = weights.to(self.loaded.device)

    def _hook(self, factor: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
        def scale(module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
            weights = self.weights
            if weights is None or output.shape[0] != weights.shape[0]:
                got = "none" if weights is None else f"{weights.shape[0]}"
                raise RuntimeError(f"feddpa per_input: a forward pass of {output.shape[0]} rows got mixing weights "
                                   f"for {got}; weights are set per batch, before its forward pass")
            shape = (-1,) + (1,) * (output.dim() - 1)
            return output * factor(weights).to(output.dtype).view(shape)

        return scale


# ---- the strategy ---------------------------------------------------------------------------------

@register_strategy
class FedDPA(Strategy):
    name = "feddpa"
    description = "global adapter shared + local adapter private, mixed per input or with a fixed weight"
    extra_adapters = (LOCAL,)

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self._loaded: Any = None
        self._pool: tuple[list[Any], torch.Tensor] | None = None  # training examples, their lambdas

    @property
    def per_input(self) -> bool:
        return self.config.strategy.feddpa_mode == "per_input"

    def is_shared(self, key: str, phase: str) -> bool:
        return f".{GLOBAL}." in key and not is_head(key)

    def incompatibility(self, keys: list[str]) -> str | None:
        why = self.needs_lora(keys, "feddpa mixes two LoRA adapters")
        odd = next((k for k in keys if any(part in k for part in PER_INPUT_UNSUPPORTED)), None)
        if why or not self.per_input or odd is None:
            return why
        return (f"strategy.feddpa_mode=per_input weights each input's LoRA outputs on their own, which DoRA and "
                f"LoRA on embedding layers do not allow (found '{odd}'); use peft.method=lora on linear layers, "
                "or strategy.feddpa_mode=fixed")

    def configure_model(self, loaded: Any, phase: str) -> None:
        set_mix(loaded, self.config.strategy.feddpa_mix)
        self._loaded = loaded

    def prepare_export(self, loaded: Any) -> None:
        if self.per_input:
            raise ConfigError("feddpa with strategy.feddpa_mode=per_input mixes its two adapters with a weight of "
                              "each input's own, which no single peft adapter holds. Export a run made with "
                              "strategy.feddpa_mode=fixed (its mix is folded into one LoRA adapter).")

    def local_train(self, train: Callable[..., dict[str, float]], phase: Phase) -> dict[str, float]:
        if not self.per_input:
            return self._train_both(train, phase)
        from fedpeft.learning.training import batch_listener

        if self._loaded is None:
            raise RuntimeError("feddpa per_input: configure_model(loaded, phase) must run before local_train")
        with PerInputMix(self._loaded) as mixer, \
                batch_listener(lambda examples, rows: mixer.use(self._training_weights(examples)[rows])):
            return self._train_both(train, phase)

    def _train_both(self, train: Callable[..., dict[str, float]], phase: Phase) -> dict[str, float]:
        glob = train(trainable=lambda k: self.is_shared(k, phase.name) or is_head(k), epochs=phase.epochs)
        local = train(trainable=lambda k: f".{LOCAL}." in k or is_head(k), epochs=phase.epochs)
        return {"train_loss": local["train_loss"], "global_loss": glob["train_loss"], "steps": glob["steps"] + local["steps"]}

    def _training_weights(self, examples: list[Any]) -> torch.Tensor:
        """Each training example's lambda, leave-one-out, computed once per list of examples."""
        if self._pool is None or self._pool[0] is not examples:
            self._pool = (examples, input_weights(self._loaded, self.config, examples, examples))
        return self._pool[1]

    def predict(self, loaded: Any, user: Any, task: Any) -> list[str]:
        if not self.per_input:
            return super().predict(loaded, user, task)
        from fedpeft.learning.training import batch_listener, predict

        weights = input_weights(loaded, self.config, user.test, user.train)
        with PerInputMix(loaded) as mixer, batch_listener(lambda examples, rows: mixer.use(weights[rows])):
            return predict(loaded, user.test, task, self.config)
