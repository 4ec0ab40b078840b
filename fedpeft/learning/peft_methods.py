"""PEFT methods by name: each builds a peft config from the ``peft.*`` keys of the schema.

Every method here is a real peft method (the bottleneck adapters are registered into peft by
``fedpeft.learning.adapters.bottleneck``). ``SIZE_KNOBS`` names the option that scales each method's
trainable parameters, which ``peft.target_params`` searches (PEFT-U's equal-parameter comparison).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedpeft.config import Config, ConfigError

# Methods that add weight deltas to linear layers and take LoRA-style target modules.
LORA_FAMILY = ("lora", "dora", "loha", "lokr", "vera")
PROMPT_FAMILY = ("prompt_tuning", "prefix_tuning", "p_tuning")
BOTTLENECK = ("bottleneck",)
NO_TRAINING = ("zero_shot", "few_shot")
METHODS = LORA_FAMILY + ("ia3",) + PROMPT_FAMILY + BOTTLENECK + NO_TRAINING

# The option that scales a method's size (None: no knob; target_params is refused).
SIZE_KNOBS: dict[str, str | None] = {
    **{m: "r" for m in LORA_FAMILY}, "ia3": None,
    **{m: "num_virtual_tokens" for m in PROMPT_FAMILY}, "bottleneck": "reduction_factor",
    "zero_shot": None, "few_shot": None,
}


def _targets(config: Config, model_type: str, mapping_name: str) -> list[str]:
    if config.peft.target_modules:
        return list(config.peft.target_modules)
    from peft.utils import constants

    mapping: dict[str, Any] = getattr(constants, mapping_name)
    if not mapping.get(model_type):
        raise ConfigError(
            f"peft has no default target modules of '{config.peft.method}' for model type '{model_type}'. "
            "Set peft.target_modules, e.g. peft.target_modules=q_proj,v_proj."
        )
    return list(mapping[model_type])


def _lora_family(config: Config, model_type: str, task_type: Any) -> Any:
    import peft

    p, method = config.peft, config.peft.method
    mapping = f"TRANSFORMERS_MODELS_TO_{'LORA' if method == 'dora' else method.upper()}_TARGET_MODULES_MAPPING"
    targets = _targets(config, model_type, mapping)
    if method in ("lora", "dora"):
        return peft.LoraConfig(task_type=task_type, r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                               target_modules=targets, use_dora=method == "dora")
    if method == "loha":
        return peft.LoHaConfig(task_type=task_type, r=p.r, alpha=p.alpha, rank_dropout=p.dropout, target_modules=targets)
    if method == "lokr":
        return peft.LoKrConfig(task_type=task_type, r=p.r, alpha=p.alpha, rank_dropout=p.dropout, target_modules=targets)
    return peft.VeraConfig(task_type=task_type, r=p.r, vera_dropout=p.dropout, target_modules=targets,
                           projection_prng_key=config.seed)


def _ia3(config: Config, model_type: str, task_type: Any) -> Any:
    import peft

    targets = _targets(config, model_type, "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING")
    if config.peft.target_modules:
        feedforward = [t for t in targets if t in config.peft.feedforward_modules] if config.peft.feedforward_modules else []
    else:
        from peft.utils.constants import (
            TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as ff,
        )

        feedforward = list(ff.get(model_type) or [])
    return peft.IA3Config(task_type=task_type, target_modules=targets, feedforward_modules=feedforward)


def _prompt_family(config: Config, model_type: str, task_type: Any) -> Any:
    import peft

    p = config.peft
    if p.method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens)
    if p.method == "prefix_tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens,
                                       prefix_projection=p.prefix_projection, encoder_hidden_size=p.encoder_hidden_size)
    return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens,
                                    encoder_reparameterization_type=p.encoder_type.upper(),
                                    encoder_hidden_size=p.encoder_hidden_size)


def _bottleneck(config: Config, model_type: str, task_type: Any) -> Any:
    from fedpeft.learning.adapters.bottleneck import BottleneckConfig

    kwargs: dict[str, Any] = {"task_type": task_type, "adapter_type": config.peft.adapter_type,
                              "reduction_factor": config.peft.reduction_factor}
    if config.peft.target_modules:
        kwargs["target_modules"] = list(config.peft.target_modules)
    return BottleneckConfig(**kwargs)


BUILDERS: dict[str, Callable[[Config, str, Any], Any]] = {
    **{m: _lora_family for m in LORA_FAMILY}, "ia3": _ia3,
    **{m: _prompt_family for m in PROMPT_FAMILY}, "bottleneck": _bottleneck,
}


def peft_config(config: Config, model_type: str, task_type: Any) -> Any:
    """The peft config of ``config.peft.method`` for a backbone of ``model_type``."""
    method = config.peft.method
    if method in NO_TRAINING:
        raise ConfigError(f"peft.method={method} trains no adapter; it needs a generative backbone (seq2seq or causal).")
    if method not in BUILDERS:
        raise ConfigError(f"Unknown peft.method '{method}'. Known methods: {', '.join(METHODS)}.")
    return BUILDERS[method](config, model_type, task_type)
