"""Bottleneck adapters (Houlsby and Pfeiffer) as a peft method named ``bottleneck``.

peft has no bottleneck adapter and AdapterHub's ``adapters`` package does not import beside
transformers 5, so this module adds one through peft's own extension point,
``peft.utils.register_peft_method``. Afterwards the usual peft API works unchanged::

    import fedpeft.learning.adapters.bottleneck  # noqa: F401  (registers the method; see below)
    from peft import PeftModel, get_peft_model

    model = get_peft_model(base, BottleneckConfig(adapter_type="pfeiffer", task_type="SEQ_CLS"))
    model.save_pretrained(path)
    ...
    model = PeftModel.from_pretrained(fresh_base, path)

**Import requirement.** peft finds a method only through its registry, which lives in memory.
Every Python process that builds *or loads* a bottleneck adapter (``PeftModel.from_pretrained``,
``PeftConfig.from_pretrained``, ``set_peft_model_state_dict`` on a fresh model, Ray workers) must
run ``import fedpeft.learning.adapters.bottleneck`` (or ``import fedpeft.learning.adapters``) first; otherwise peft
fails with ``KeyError: 'BOTTLENECK'``. Importing it again is harmless.

Placement follows AdapterHub (``SeqBnConfig`` = Pfeiffer, ``DoubleSeqBnConfig`` = Houlsby), with
``h`` the output of a sublayer (attention or feed-forward, after its dropout), ``x`` the sublayer
input and ``A(v) = up(act(down(v)))``:

* Houlsby (two adapters per layer: attention and feed-forward): ``x + h + A(h)``, then the
  model's own LayerNorm for post-LN encoders. The adapter wraps the module that produces ``h``.
* Pfeiffer (one adapter per layer, feed-forward only): post-LN (BERT):
  ``LN(x + h + A(LN(x + h)))`` -- the adapter wraps the feed-forward LayerNorm, reads its output
  and feeds back into it (AdapterHub's ``original_ln_before`` + ``original_ln_after``); pre-LN
  (T5, GPT-2, Llama): ``s + A(s)`` with ``s = x + h`` -- the adapter wraps the module returning
  ``s`` (T5's ``T5LayerFF``, a whole GPT-2/Llama block, whose feed-forward residual is its last
  operation).

Down- and up-projection both have biases and no extra LayerNorm, so on all-MiniLM-L6-v2
(hidden 384, 6 layers) with ``reduction_factor=16``: Pfeiffer has 6 * (384*24 + 24 + 24*384 + 384)
= 113,040 parameters, Houlsby twice that, 226,080 -- AdapterHub's numbers.

Adapters cannot be merged into the base weights (they are non-linear); ``unload()`` works. On
pre-LN models a Pfeiffer adapter wraps whole blocks, so to mix types on one model add the Houlsby
adapter first (peft does not look inside modules that are already wrapped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType, register_peft_method
from torch import nn
from transformers.activations import ACT2FN, get_activation
from transformers.pytorch_utils import Conv1D

ADAPTER_TYPES = ("houlsby", "pfeiffer")
# AdapterHub's defaults: SeqBnConfig (Pfeiffer) uses "relu", DoubleSeqBnConfig (Houlsby) "swish".
DEFAULT_NON_LINEARITY = {"pfeiffer": "relu", "houlsby": "swish"}
INIT_SCHEMES = ("bert", "mam_adapter", "houlsby")
_METHOD_NAME = "bottleneck"
_PREFIX = "bottleneck_"


def _extend_peft_type(name: str) -> PeftType:
    """Add ``name`` to peft's ``PeftType`` enum and return the member.

    ``register_peft_method`` only accepts names already listed in that closed enum (peft's own
    methods are added by editing it), so an out-of-tree method has to extend it at run time. This
    mirrors what ``enum`` does for a declared member; idempotent.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    if hasattr(PeftType.LORA, "_sort_order_"):  # Python >= 3.11
        member._sort_order_ = len(PeftType._member_names_)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ refuses new members
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


BOTTLENECK: PeftType = _extend_peft_type(_METHOD_NAME.upper())


@dataclass(frozen=True)
class Placement:
    """Module-name regexes (without the model prefix) for one backbone family.

    ``attention``/``ffn``: modules whose output is that sublayer's branch ``h`` (Houlsby).
    ``ffn_sum``: the LayerNorm that receives ``x + h`` (post-LN) or the module returning it (pre-LN)
    for the feed-forward sublayer (Pfeiffer). ``cross*``: the same for cross-attention.
    """

    attention: str
    ffn: str
    ffn_sum: str
    cross: str | None = None
    cross_sum: str | None = None


_BERT_LIKE = Placement(
    attention=r"layer\.\d+\.attention\.output\.dropout",
    ffn=r"layer\.\d+\.output\.dropout",
    ffn_sum=r"layer\.\d+\.output\.LayerNorm",
)
_LLAMA_LIKE = Placement(
    attention=r"layers\.\d+\.self_attn\.o_proj", ffn=r"layers\.\d+\.mlp\.down_proj", ffn_sum=r"layers\.\d+"
)
_T5_FF_LAYER = r"(?:encoder\.block\.\d+\.layer\.1|decoder\.block\.\d+\.layer\.2)"
_T5_LIKE = Placement(
    attention=r"(?:encoder|decoder)\.block\.\d+\.layer\.0\.dropout",
    ffn=_T5_FF_LAYER + r"\.dropout",
    ffn_sum=_T5_FF_LAYER,
    cross=r"decoder\.block\.\d+\.layer\.1\.dropout",
    cross_sum=r"decoder\.block\.\d+\.layer\.1",
)
PLACEMENTS: dict[str, Placement] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), _BERT_LIKE),
    "distilbert": Placement(
        attention=r"layer\.\d+\.attention\.out_lin",
        ffn=r"layer\.\d+\.ffn\.dropout",
        ffn_sum=r"layer\.\d+\.output_layer_norm",
    ),
    "t5": _T5_LIKE,
    "mt5": _T5_LIKE,
    "gpt2": Placement(attention=r"h\.\d+\.attn\.resid_dropout", ffn=r"h\.\d+\.mlp\.dropout", ffn_sum=r"h\.\d+"),
    **dict.fromkeys(("llama", "mistral", "qwen2"), _LLAMA_LIKE),
}


def default_target_modules(model_type: str | None, adapter_type: str, cross_adapter: bool = False) -> str:
    """The ``target_modules`` regex for a backbone family (``model_type`` of its HF config)."""
    placement = PLACEMENTS.get(model_type or "")
    if placement is None:
        raise ValueError(
            f"No default bottleneck adapter placement for model_type={model_type!r}. Known model types: "
            f"{', '.join(sorted(PLACEMENTS))}. Pass target_modules= (a regex or module names) naming the "
            "modules whose outputs the adapters should follow."
        )
    parts = [placement.attention, placement.ffn] if adapter_type == "houlsby" else [placement.ffn_sum]
    if cross_adapter:
        cross = placement.cross if adapter_type == "houlsby" else placement.cross_sum
        if cross is None:
            raise ValueError(
                f"cross_adapter=True, but model_type={model_type!r} has no cross-attention placement "
                "(only encoder-decoder models such as t5 have one). Set cross_adapter=False."
            )
        parts.append(cross)
    return r"(?:.*\.)?(?:" + "|".join(parts) + ")"


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of a bottleneck adapter (Houlsby or Pfeiffer, as in AdapterHub).

    Args:
        adapter_type: "houlsby" (adapters after attention and feed-forward) or "pfeiffer"
            (after feed-forward only).
        reduction_factor: bottleneck width = hidden size / reduction_factor; must divide it.
        non_linearity: activation between the projections, any key of transformers' ``ACT2FN``.
            ``None`` means AdapterHub's default for the type: "relu" (Pfeiffer), "swish" (Houlsby).
        init_weights: "bert" (AdapterHub's default: both projections N(0, 0.02), zero biases, so
            the adapter starts near identity), "mam_adapter" (zero up-projection: exact identity)
            or "houlsby" (truncated N(0, 0.01)).
        target_modules: regex or module names to wrap; ``None`` picks the family default.
        exclude_modules: regex or module names never to wrap.
        cross_adapter: also adapt decoder cross-attention (encoder-decoder models; AdapterHub's
            default is False).
        modules_to_save: extra modules trained and saved in full, e.g. ``["classifier"]``
            (added automatically for ``task_type="SEQ_CLS"``).
    """

    adapter_type: Literal["houlsby", "pfeiffer"] = field(
        default="pfeiffer", metadata={"help": "'houlsby' or 'pfeiffer'"}
    )
    reduction_factor: int = field(default=16, metadata={"help": "hidden size / bottleneck width"})
    non_linearity: str | None = field(default=None, metadata={"help": "activation, key of ACT2FN"})
    init_weights: str = field(default="bert", metadata={"help": "one of " + ", ".join(INIT_SCHEMES)})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "modules to wrap; None = family default"}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "modules to skip"})
    cross_adapter: bool = field(default=False, metadata={"help": "adapt decoder cross-attention"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules trained and saved in full, e.g. a classifier"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(
                f"adapter_type={self.adapter_type!r} is not a bottleneck adapter type; allowed: "
                "'houlsby' (attention + feed-forward adapters) or 'pfeiffer' (feed-forward only)."
            )
        rf = self.reduction_factor
        if isinstance(rf, bool) or not isinstance(rf, int) or rf < 1:
            raise ValueError(f"reduction_factor={rf!r} must be a positive integer (e.g. 16) dividing the hidden size.")
        if self.non_linearity is None:
            self.non_linearity = DEFAULT_NON_LINEARITY[self.adapter_type]
        if self.non_linearity not in ACT2FN:
            raise ValueError(
                f"non_linearity={self.non_linearity!r} is not a known activation; allowed: {', '.join(ACT2FN)}."
            )
        if self.init_weights not in INIT_SCHEMES:
            raise ValueError(f"init_weights={self.init_weights!r} is not allowed; use one of {INIT_SCHEMES}.")


def _is_norm(module: nn.Module) -> bool:
    """True for LayerNorm-like modules (nn.LayerNorm, T5LayerNorm, LlamaRMSNorm, ...)."""
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


def _map_first(output: Any, fn: Any) -> Any:
    """Apply ``fn`` to a module output, or to its first element if it is a tuple."""
    if isinstance(output, tuple):
        return (fn(output[0]), *output[1:])
    return fn(output)


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """Wraps one module and adds bottleneck adapter(s) after it (see the module docstring).

    Usually the output ``y`` becomes ``y + A(y)`` (the first element if the module returns a
    tuple). A Pfeiffer adapter on a norm layer ``N`` instead turns ``N(z)`` into
    ``N(z + A(N(z)))``. Parameters live in ``bottleneck_down.<adapter>`` /
    ``bottleneck_up.<adapter>`` so several adapters can sit on one module; active ones apply in order.
    """

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act", "bottleneck_reads_norm")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig, width: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_act = nn.ModuleDict()
        self.bottleneck_reads_norm: dict[str, bool] = {}
        self._active_adapter = adapter_name
        self.merged_adapters = []
        self.update_layer(adapter_name, config, width)

    def update_layer(self, adapter_name: str, config: BottleneckConfig, width: int) -> None:
        """Create adapter ``adapter_name``: ``width -> width // reduction_factor -> width``."""
        down = nn.Linear(width, width // config.reduction_factor)
        up = nn.Linear(width // config.reduction_factor, width)
        with torch.no_grad():
            if config.init_weights == "bert":
                for linear in (down, up):
                    linear.weight.normal_(mean=0.0, std=0.02)
                    linear.bias.zero_()
            elif config.init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(down.weight, a=5**0.5)
                for tensor in (down.bias, up.weight, up.bias):
                    tensor.zero_()
            else:  # "houlsby"
                for linear in (down, up):
                    nn.init.trunc_normal_(linear.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
                    linear.bias.zero_()
        existing = [*self.get_base_layer().parameters(), *self.bottleneck_down.parameters()]
        reference = next((p for p in existing if p.is_floating_point()), None)
        if reference is not None and not down.weight.is_meta:  # meta: peft's low_cpu_mem_usage loading
            down, up = down.to(reference.device, reference.dtype), up.to(reference.device, reference.dtype)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_act[adapter_name] = get_activation(config.non_linearity)
        self.bottleneck_reads_norm[adapter_name] = config.adapter_type == "pfeiffer" and _is_norm(
            self.get_base_layer()
        )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _bottleneck(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """``A(hidden) = up(act(down(hidden)))`` computed in the adapter's dtype."""
        down = self.bottleneck_down[adapter_name]
        out = self.bottleneck_up[adapter_name](self.bottleneck_act[adapter_name](down(hidden.to(down.weight.dtype))))
        return out.to(hidden.dtype)

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        active = [] if self.disable_adapters else [a for a in self.active_adapters if a in self.bottleneck_down]
        for name in active:
            if self.bottleneck_reads_norm[name]:  # x is the sum fed to the norm: x + A(norm(x))
                x = x + self._bottleneck(name, self.base_layer(x, *args, **kwargs))
        output = self.base_layer(x, *args, **kwargs)
        for name in active:
            if not self.bottleneck_reads_norm[name]:
                output = _map_first(output, lambda h, name=name: h + self._bottleneck(name, h))
        return output

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError("Bottleneck adapters are non-linear and cannot be merged; use unload() to remove them.")

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def __getattr__(self, name: str) -> Any:
        """Fall back to the wrapped module (models read e.g. ``layer.attention_type``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)

    def __repr__(self) -> str:
        return "bottleneck." + super().__repr__()


def _adapter_width(target: nn.Module, model: nn.Module, key: str) -> int:
    """Width of the hidden states leaving ``target`` (the adapter's input and output size)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear):
        return base.out_features
    if isinstance(base, Conv1D):
        return base.nf
    if _is_norm(base) and getattr(base, "weight", None) is not None:
        return base.weight.shape[-1]
    model_config = BaseTuner.get_model_config(model)  # as AdapterHub: the model's hidden size
    for name in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(model_config.get(name), int):
            return model_config[name]
    raise ValueError(
        f"Cannot tell the hidden size at module {key!r} ({type(base).__name__}): it is not a Linear, "
        "Conv1D or norm layer and the model config has no hidden_size/d_model/n_embd. Target such a layer."
    )


class BottleneckModel(BaseTuner):
    """peft tuner that injects :class:`BottleneckLayer` wrappers (use via ``get_peft_model``)."""

    prefix: str = _PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(
                model_config.get("model_type"), peft_config.adapter_type, peft_config.cross_adapter
            )
        return peft_config

    def _create_and_replace(
        self,
        peft_config: BottleneckConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        parameter_name: str | None = None,
    ) -> None:
        width = _adapter_width(target, self.model, current_key)
        if width % peft_config.reduction_factor:
            divisors = [d for d in range(2, width + 1) if width % d == 0][:8]
            raise ValueError(
                f"reduction_factor={peft_config.reduction_factor} does not divide the hidden size {width} "
                f"at {current_key!r}; use a divisor of {width}, e.g. one of {divisors}."
            )
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config, width)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config, width)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # peft's version copies ``child.weight`` and asks parameter-free children (Dropout) for a
        # device; adapters are already on the base layer's device (update_layer) or the parent's.
        setattr(parent, child_name, new_module)
        if isinstance(new_module, BottleneckLayer) and not any(True for _ in child.parameters()):
            siblings = (p for n, p in parent.named_parameters() if not n.startswith(f"{child_name}."))
            reference = next((p for p in siblings if p.is_floating_point()), None)
            adapters = [getattr(new_module, name) for name in new_module.adapter_layer_names]
            if reference is not None and not any(p.is_meta for a in adapters for p in a.parameters()):
                for adapter in adapters:
                    adapter.to(reference.device, reference.dtype)

    def _check_merge_allowed(self) -> None:
        raise ValueError("Bottleneck adapters are non-linear and cannot be merged; use unload() to remove them.")


if BOTTLENECK not in PEFT_TYPE_TO_CONFIG_MAPPING:  # importing twice (e.g. importlib.reload) is fine
    register_peft_method(
        name=_METHOD_NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=_PREFIX,
        is_mixed_compatible=False,
    )

__all__ = [
    "ADAPTER_TYPES", "BOTTLENECK", "PLACEMENTS", "BottleneckConfig", "BottleneckLayer", "BottleneckModel",
    "Placement", "default_target_modules",
]
