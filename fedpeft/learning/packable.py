"""What packs: which PEFT methods and strategies ``train.pack_users`` > 1 can run, and why not.

Packing (:mod:`fedpeft.learning.packing`) stacks k users' vanilla LoRA adapters in one forward
pass, so it fits one LoRA adapter per user and strategies whose local training calls
``train(trainable=, epochs=)`` the same way for every user. :func:`packing_incompatibility` says
why a method or strategy does not pack (or None); :func:`check_packing` refuses such a run before
it starts, and also one whose LoRA layers or head the packed model cannot stack.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedpeft.config import Config, ConfigError
from fedpeft.learning.models import LoadedModel
from fedpeft.learning.packed_lora import PackedModel
from fedpeft.learning.peft_methods import METHODS

PACKABLE_METHODS = ("lora",)
PACKABLE_STRATEGIES = ("local_only", "fedavg", "fedavg_ft", "fedper", "fedrep", "fedsa", "ffa")
_WHY_NOT_METHOD = {
    "dora": "DoRA rescales each user's whole weight W + BA by its own column norm, which is not a per-row delta",
    "loha": "LoHa's delta is a Hadamard product of two low-rank products, not one stacked A/B pair",
    "lokr": "LoKr's delta is a Kronecker product, not one stacked A/B pair",
    "vera": "VeRA's shared random matrices and per-user scaling vectors are not stacked here",
    "ia3": "IA3 rescales activations per user (a different packed layer, not built)",
    "prompt_tuning": "virtual tokens change each user's input sequence, not a linear layer's output",
    "prefix_tuning": "per-user prefixes enter every attention layer's keys and values, not a linear layer's output",
    "p_tuning": "a per-user prompt encoder changes each user's input sequence, not a linear layer's output",
    "bottleneck": "bottleneck adapters are extra per-user modules, not a linear layer's low-rank delta",
    "zero_shot": "nothing trains: there is no adapter to pack",
    "few_shot": "nothing trains, and each user's prompt carries its own demonstrations",
}
_WHY_NOT_STRATEGY = {
    "oppu": "oppu stacks a personal LoRA adapter on a task adapter (two adapters per user)",
    "feddpa": "feddpa mixes a global and a local adapter per input (two adapters per user, per-row mixing weights)",
}


def packing_incompatibility(config_or_method: Config | str, strategy_name: str,
                            extra_adapters: Sequence[str] = ()) -> str | None:
    """Why ``train.pack_users`` > 1 cannot run this method and strategy, or None when it can.

    Packs: peft.method in {PACKABLE_METHODS} with one adapter, strategies {PACKABLE_STRATEGIES}.
    """
    method = config_or_method if isinstance(config_or_method, str) else config_or_method.peft.method
    fits = (f"Packing (train.pack_users > 1) fits peft.method={'/'.join(PACKABLE_METHODS)} with the strategies "
            f"{', '.join(PACKABLE_STRATEGIES)}; set train.pack_users=1 to run this one user per call.")
    if method not in PACKABLE_METHODS:
        why = _WHY_NOT_METHOD.get(method, f"'{method}' is not one of the known methods {', '.join(METHODS)}")
        return f"peft.method={method} does not pack: {why}. {fits}"
    if strategy_name in _WHY_NOT_STRATEGY:
        return f"strategy {strategy_name} does not pack: {_WHY_NOT_STRATEGY[strategy_name]}. {fits}"
    if extra_adapters:
        return (f"strategy {strategy_name} adds adapters {', '.join(extra_adapters)} beside 'default': "
                f"a packed layer holds one adapter per user. {fits}")
    if strategy_name not in PACKABLE_STRATEGIES:
        return (f"strategy {strategy_name} is not known to pack (its local training must call train(trainable=, "
                f"epochs=) the same way for every user, with no batch listener or extra adapter). {fits}")
    return None


def check_packing(config: Config, strategy_name: str, extra_adapters: Sequence[str], loaded: LoadedModel) -> None:
    """Refuse ``train.pack_users`` > 1 before the run starts where it cannot pack (the method,
    the strategy, or a LoRA layer or head the packed model cannot stack), saying what packs."""
    if config.train.pack_users <= 1:
        return
    why = packing_incompatibility(config, strategy_name, extra_adapters)
    if why is None:
        try:
            PackedModel.of(loaded)
        except ValueError as err:
            why = str(err)
    if why is not None:
        raise ConfigError(f"train.pack_users={config.train.pack_users}: {why}")
