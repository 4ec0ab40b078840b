"""Backbones and adapters: build the peft model, cache it per process, move adapter state in and out.

A Ray worker builds its backbone once (the first client call it serves) and keeps it in the
module-level cache below for the rest of its life; each client call only swaps the adapter
weights in. ``BACKBONE_LOADS`` counts builds so tests can check that. Model names are resolved,
and their files checked, in :mod:`fedpeft.learning.model_files`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.config import Config, ConfigError
from fedpeft.learning.model_files import quiet_transformers, resolve_model_path

# Model types loaded as encoders with a sequence-classification head (model.kind=auto).
ENCODER_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra",
                           "albert", "mpnet", "camembert", "modernbert"})

BACKBONE_LOADS = 0
_CACHE: dict[str, LoadedModel] = {}


def import_libraries() -> None:
    """Import what building and running a model needs (transformers' model code and peft: most
    of a worker's start-up on a CPU), without building anything."""
    import peft  # noqa: F401
    import transformers.modeling_utils  # noqa: F401
    from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: F401

    import fedpeft.learning.adapters  # noqa: F401


WARM_MODEL_ENV = "FEDPEFT_WORKER_MODEL"  # the model a Ray worker builds as it starts (fedpeft.federation.client_app.warm_up)


def warm_model_spec(config: Config, num_labels: int, extra_adapters: tuple[str, ...]) -> str | None:
    """:data:`WARM_MODEL_ENV`'s value for a run (what :func:`get_model` is called with), or None
    where a worker must not build the model as it starts: GPU workers (Ray assigns the device to
    the actor after its process starts) and ``peft.target_params`` (the driver sizes the adapter
    first)."""
    if config.ray.client_gpus > 0 or config.peft.target_params:
        return None
    return json.dumps({"config": config.to_json(), "num_labels": num_labels, "extra_adapters": list(extra_adapters)})


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DTYPES = ("float32", "bfloat16")  # float16 weights on the CPU: AdamW's first step makes the head NaN


def _dtype(config: Config) -> torch.dtype:
    """The backbone's weights dtype (``model.dtype``); peft keeps LoRA weights in float32."""
    if config.ray.client_gpus <= 0 and config.model.dtype not in CPU_DTYPES:
        raise ConfigError(f"model.dtype={config.model.dtype} does not train on the CPU (the weights turn NaN). "
                          f"On CPU clients use one of: {', '.join(CPU_DTYPES)}; float16 needs GPU clients "
                          "(ray.client_gpus > 0).")
    return DTYPES[config.model.dtype]


@dataclass
class LoadedModel:
    """A peft model on a frozen backbone, its tokenizer and the adapter's initial state.

    Adapter state dicts are keyed by parameter name (``...lora_A.default.weight``,
    ``...classifier.modules_to_save.default.weight``), so several adapters on one backbone
    never collide; strategies split them with key filters. ``kind`` is "encoder" (with a
    classification head), "seq2seq" or "causal".
    """

    model: torch.nn.Module
    tokenizer: Any
    init_state: dict[str, torch.Tensor]
    device: torch.device
    kind: str = "encoder"
    _params: dict[str, torch.nn.Parameter] | None = field(default=None, repr=False, compare=False)

    @property
    def adapter_keys(self) -> list[str]:
        return list(self.init_state)

    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        """Every parameter by name; looked up once (a model's parameters are fixed once built),
        since walking the module tree is a measurable part of a client call."""
        if self._params is None:
            self._params = dict(self.model.named_parameters())
        return self._params


def backbone_kind(config: Config, model_config: Any) -> str:
    """encoder / seq2seq / causal: ``model.kind``, or read off the backbone's config."""
    if config.model.kind != "auto":
        return config.model.kind
    if getattr(model_config, "is_encoder_decoder", False):
        return "seq2seq"
    if model_config.model_type in ENCODER_TYPES:
        return "encoder"
    return "causal"


def load_backbone(config: Config, num_labels: int) -> tuple[Any, str, Any]:
    """(frozen backbone, its kind, the peft task type) for ``model.name``."""
    import peft
    from transformers import AutoConfig

    path = resolve_model_path(config.model.name)
    kind = backbone_kind(config, AutoConfig.from_pretrained(path))
    task_type = {"encoder": peft.TaskType.SEQ_CLS, "seq2seq": peft.TaskType.SEQ_2_SEQ_LM, "causal": peft.TaskType.CAUSAL_LM}[kind]
    return _load_backbone(config, path, kind, num_labels), kind, task_type


def _load_backbone(config: Config, path: str, kind: str, num_labels: int) -> Any:
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    if kind == "encoder" and config.model.dtype == "float16":
        raise ConfigError("model.dtype=float16 does not train an encoder's classification head: AdamW on float16 "
                          "weights without loss scaling turns them NaN at the first step (seen on CPU and on an H100). "
                          "Use --dtype bfloat16 (same memory, trains) or float32.")
    if kind == "encoder":  # the classification head is new: its size never matches a checkpoint's
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=_dtype(config),
                                                                  ignore_mismatched_sizes=True)
    cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=_dtype(config))


def _prepare_tokenizer(tokenizer: Any, base: Any, kind: str) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == "causal":
        if tokenizer.eos_token is None:  # e.g. a BERT tokenizer on a small test decoder
            tokenizer.eos_token = tokenizer.sep_token
        tokenizer.padding_side = "left"  # generation continues the prompt
        base.generation_config.eos_token_id = tokenizer.eos_token_id
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    if getattr(base, "generation_config", None) is not None and base.generation_config.pad_token_id is None:
        base.generation_config.pad_token_id = tokenizer.pad_token_id


def build_model(config: Config, num_labels: int, extra_adapters: tuple[str, ...] = ()) -> LoadedModel:
    """Load the backbone and attach fresh adapters; deterministic from ``config.seed``.

    ``extra_adapters`` adds more adapters of the same method and shape (no head of their own),
    all active together with the default one (e.g. a personal adapter on a task adapter).
    """
    from peft import get_peft_model
    from transformers import AutoTokenizer

    import fedpeft.learning.adapters  # noqa: F401  (registers the bottleneck adapters as a peft method)
    from fedpeft.learning.peft_methods import NO_TRAINING, peft_config

    global BACKBONE_LOADS
    quiet_transformers()
    torch.manual_seed(config.seed)  # the classifier head and adapter inits are drawn from this
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(config.model.name))
    base, kind, task_type = load_backbone(config, num_labels)
    _prepare_tokenizer(tokenizer, base, kind)
    method_config = config
    if config.peft.method in NO_TRAINING:  # an untouched LoRA adapter (B = 0) leaves the backbone as it is
        method_config = copy.deepcopy(config)
        method_config.peft.method = "lora"
    try:
        model = get_peft_model(base, peft_config(method_config, base.config.model_type, task_type))
    except (TypeError, ValueError) as err:  # e.g. LoHa/LoKr on GPT-2's Conv1D layers
        raise ConfigError(
            f"peft.method={config.peft.method} cannot adapt '{config.model.name}' ({base.config.model_type}): {err}. "
            "Set peft.target_modules to layers the method supports, or pick another method (lora, dora, ia3 fit every backbone)."
        ) from None
    for name in extra_adapters:
        model.add_adapter(name, peft_config(method_config, base.config.model_type, None))
    if extra_adapters:  # all adapters active together; the head stays the default one's
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(["default", *extra_adapters])
    if config.peft.method in NO_TRAINING:
        for param in model.parameters():
            param.requires_grad_(False)
    device = torch.device("cuda" if config.ray.client_gpus > 0 and torch.cuda.is_available() else "cpu")
    model.to(device)
    init_state = {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}
    BACKBONE_LOADS += 1
    return LoadedModel(model=model, tokenizer=tokenizer, init_state=init_state, device=device, kind=kind)


def _cache_key(config: Config, num_labels: int, extra_adapters: tuple[str, ...]) -> str:
    return "|".join([config.model.name, config.model.dtype, str(config.ray.client_gpus > 0),
                     repr(sorted(vars(config.peft).items())), str(num_labels), str(config.seed), ",".join(extra_adapters)])


def get_model(config: Config, num_labels: int, extra_adapters: tuple[str, ...] = ()) -> LoadedModel:
    """The process-wide cached model for this config (built on first use only)."""
    key = _cache_key(config, num_labels, extra_adapters)
    if key not in _CACHE:
        _CACHE.clear()  # one backbone per worker: a new config replaces the old one
        _CACHE[key] = build_model(config, num_labels, extra_adapters)
    return _CACHE[key]


def load_adapter_state(loaded: LoadedModel, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors (keyed by parameter name) into the model."""
    params = loaded.parameters_by_name()
    unknown = [k for k in state if k not in loaded.init_state]
    if unknown:
        raise KeyError(f"Adapter state has keys this model's adapter does not have, e.g. '{unknown[0]}'")
    with torch.no_grad():
        for key, value in state.items():
            params[key].copy_(value.to(params[key].device, params[key].dtype))


def composed_state(loaded: LoadedModel, shared: dict[str, torch.Tensor],
                   private: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """One user's full adapter state: common init, then the current shared part, then the user's
    private part (later ones win). The one place a user's model is composed: the client, export,
    the packed trainer (:mod:`fedpeft.learning.packing`) and the tests' reference all use it."""
    return {**loaded.init_state, **shared, **(private or {})}


def compose_user_model(loaded: LoadedModel, shared: dict[str, torch.Tensor], private: dict[str, torch.Tensor] | None) -> None:
    """Load one user's model into ``loaded``: its :func:`composed_state`."""
    load_adapter_state(loaded, composed_state(loaded, shared, private))


def adapter_state(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    params = loaded.parameters_by_name()
    return {k: params[k].detach().clone().cpu() for k in loaded.init_state}


def set_trainable(loaded: LoadedModel, predicate) -> list[torch.nn.Parameter]:
    """Let exactly the adapter parameters whose key satisfies ``predicate`` train; returns them."""
    params = loaded.parameters_by_name()
    chosen = []
    for key in loaded.init_state:
        params[key].requires_grad_(bool(predicate(key)))
        if params[key].requires_grad:
            chosen.append(params[key])
    return chosen


def fit_size_knob(config: Config, num_labels: int) -> tuple[str, int, int]:
    """Set the method's size knob so trainable parameters come closest to ``peft.target_params``.

    Returns (knob, chosen value, trainable parameters). LoRA-family ranks and virtual tokens grow
    parameters linearly, so two probes give the value; bottleneck reduction factors are tried
    among those that divide the hidden size.
    """
    import peft

    import fedpeft.learning.adapters  # noqa: F401
    from fedpeft.learning.peft_methods import SIZE_KNOBS, peft_config

    method, target = config.peft.method, config.peft.target_params
    knob = SIZE_KNOBS.get(method)
    if knob is None:
        raise ConfigError(f"peft.target_params is set but peft.method={method} has no size knob to scale. "
                          f"Methods with one: {', '.join(m for m, k in SIZE_KNOBS.items() if k)}.")
    base, _, task_type = load_backbone(config, num_labels)

    def count(value: int) -> int:
        probe = copy.deepcopy(config)
        setattr(probe.peft, knob, value)
        model = peft.get_peft_model(copy.deepcopy(base), peft_config(probe, base.config.model_type, task_type))
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    if knob == "reduction_factor":
        hidden = base.config.hidden_size if hasattr(base.config, "hidden_size") else base.config.d_model
        candidates = {v: count(v) for v in range(1, hidden + 1) if hidden % v == 0 and hidden // v >= 1 and v <= 256}
    else:
        one, two = count(1), count(2)
        per_unit = max(1, two - one)
        guess = max(1, round(1 + (target - one) / per_unit))
        candidates = {v: count(v) for v in {max(1, guess - 1), guess, guess + 1}}
    value = min(candidates, key=lambda v: (abs(candidates[v] - target), v))
    setattr(config.peft, knob, value)
    return knob, value, candidates[value]
