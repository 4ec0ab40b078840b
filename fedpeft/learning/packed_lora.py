"""The packed LoRA layers: k users' adapters applied in one forward pass of the shared model.

The cached peft model is shared; the k users' adapters are not loaded into it. For the packed
step, every peft LoRA ``Linear`` layer computes its frozen base output once for all rows, and
each row adds its own user's delta ``B_u A_u x * scaling``, with the users' A and B stacked as
[k, r, in] and [k, out, r] and applied by ``torch.bmm`` (rows are grouped by user; equal groups
are one [k, rows, in] bmm, unequal ones gather each row's matrices). The task head that peft's
``modules_to_save`` trains (``classifier`` / ``score``) is stacked the same way. The model's own
adapter weights are not read, and :meth:`PackedModel.installed` restores the model's layers after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from fedpeft.learning.models import LoadedModel

State = dict[str, torch.Tensor]
ADAPTER = "default"


class PackedRows:
    """The packed batch's rows, grouped by user (user j owns ``groups[j]`` consecutive rows), and
    the active users' stacked adapter tensors, keyed as the adapter's state dict."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.groups: list[int] = []
        self.stacks: dict[str, torch.Tensor] = {}
        self._row_user: torch.Tensor | None = None

    def set(self, values: list[dict[str, torch.Tensor]], groups: list[int]) -> None:
        self.groups = list(groups)
        self.stacks = {key: torch.stack([v[key] for v in values]) for key in values[0]}
        self._row_user = None

    @property
    def equal(self) -> bool:
        return len(set(self.groups)) == 1

    def row_user(self) -> torch.Tensor:
        if self._row_user is None:
            counts = torch.tensor(self.groups)
            self._row_user = torch.repeat_interleave(torch.arange(len(self.groups)), counts).to(self.device)
        return self._row_user

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Row n of ``x`` ([rows, ..., in]) times its user's ``weight`` ([k, out, in]) transposed."""
        k, rows, width = len(self.groups), x.shape[0], x.shape[-1]
        if rows != sum(self.groups):
            raise RuntimeError(f"a packed layer got {rows} rows; the packed batch has {sum(self.groups)} "
                               f"(users' groups {self.groups})")
        if self.equal:  # one [k, group rows, in] x [k, in, out] product
            y = torch.bmm(x.reshape(k, -1, width), weight.transpose(1, 2))
            if bias is not None:
                y = y + bias.unsqueeze(1)
        else:  # unequal groups: each row gathers its user's matrix
            index = self.row_user()
            y = torch.bmm(x.reshape(rows, -1, width), weight.index_select(0, index).transpose(1, 2))
            if bias is not None:
                y = y + bias.index_select(0, index).unsqueeze(1)
        return y.reshape(*x.shape[:-1], weight.shape[1])

    def split(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(x, self.groups))


def _lora_forward(layer: Any, rows: PackedRows, key_a: str, key_b: str) -> Callable[..., torch.Tensor]:
    """peft's ``lora.Linear.forward`` for vanilla LoRA, with each row's own A and B."""
    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = layer.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        a, b = rows.stacks[key_a], rows.stacks[key_b]
        h = layer.lora_dropout[ADAPTER](layer._cast_input_dtype(x, a.dtype))
        result = result + rows.linear(rows.linear(h, a), b) * layer.scaling[ADAPTER]
        return result.to(result_dtype)
    return forward


def _head_forward(wrapper: Any, rows: PackedRows, keys: dict[str, str]) -> Callable[..., torch.Tensor]:
    """A ``modules_to_save`` head with each row's own weights: a Linear as one stacked product,
    any other module per user with ``torch.func.functional_call`` on its rows."""
    module = wrapper.modules_to_save[ADAPTER]

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise RuntimeError(f"a packed head takes one input tensor; {type(module).__name__} got more")
        if isinstance(module, torch.nn.Linear):
            bias = rows.stacks[keys["bias"]] if "bias" in keys else None
            return rows.linear(x, rows.stacks[keys["weight"]], bias)
        parts = rows.split(x)
        return torch.cat([torch.func.functional_call(module, {n: rows.stacks[k][j] for n, k in keys.items()}, (part,))
                          for j, part in enumerate(parts)])
    return forward


@dataclass
class PackedModel:
    """The LoRA layers and heads of a model, and the adapter keys each one reads."""

    loaded: LoadedModel
    modules: list[tuple[torch.nn.Module, Callable[..., torch.Tensor]]] = field(default_factory=list)
    rows: PackedRows | None = None

    @classmethod
    def of(cls, loaded: LoadedModel) -> PackedModel:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import ModulesToSaveWrapper

        pack, covered = cls(loaded, rows=PackedRows(loaded.device)), set()
        keys = set(loaded.init_state)
        for name, module in loaded.model.named_modules():
            if isinstance(module, LoraLayer):
                where = f"the LoRA layer '{name}' ({type(module).__name__})"
                if not isinstance(module, LoraLinear):
                    raise ValueError(f"{where} is not a linear layer; packing stacks LoRA on linear layers only. "
                                     "Set peft.target_modules to linear layers, or train.pack_users=1.")
                if list(module.active_adapters) != [ADAPTER] or module.merged or module.disable_adapters:
                    raise ValueError(f"{where} has active adapters {list(module.active_adapters)} (merged: "
                                     f"{module.merged}); packing needs the one adapter '{ADAPTER}', unmerged.")
                if module.use_dora.get(ADAPTER) or module.lora_bias.get(ADAPTER) or ADAPTER in module.lora_variant:
                    raise ValueError(f"{where} uses DoRA, a LoRA bias or another LoRA variant; packing needs vanilla LoRA")
                key_a, key_b = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
                if key_a not in keys or key_b not in keys:
                    raise ValueError(f"{where}: its weights {key_a} / {key_b} are not adapter keys of this model")
                pack.modules.append((module, _lora_forward(module, pack.rows, key_a, key_b)))
                covered |= {key_a, key_b}
            elif isinstance(module, ModulesToSaveWrapper):
                if list(module.active_adapters) != [ADAPTER] or module.disable_adapters:
                    raise ValueError(f"the head '{name}' has active adapters {list(module.active_adapters)}; "
                                     f"packing needs the one adapter '{ADAPTER}'")
                prefix = f"{name}.modules_to_save.{ADAPTER}."
                head = {n: prefix + n for n, _ in module.modules_to_save[ADAPTER].named_parameters()}
                missing = [k for k in head.values() if k not in keys]
                if missing:
                    raise ValueError(f"the head '{name}': its weight {missing[0]} is not an adapter key of this model")
                pack.modules.append((module, _head_forward(module, pack.rows, head)))
                covered |= set(head.values())
        left = [k for k in loaded.init_state if k not in covered]
        if left:
            raise ValueError(f"adapter key '{left[0]}' (of {len(left)}) is not in a LoRA linear layer or a "
                             "modules_to_save head, so it cannot pack; use train.pack_users=1")
        return pack

    @contextmanager
    def installed(self) -> Iterator[PackedRows]:
        """While active, the model's LoRA layers and heads run packed (``rows`` says how)."""
        done: list[torch.nn.Module] = []
        try:
            for module, forward in self.modules:
                if "forward" in vars(module):
                    raise RuntimeError(f"{type(module).__name__} already has its forward replaced; packing would lose it")
                module.forward = forward
                done.append(module)
            yield self.rows
        finally:
            for module in done:
                del module.forward

    def user_values(self, state: State, trainable: Callable[[str], bool] | None) -> dict[str, torch.Tensor]:
        """One user's adapter tensors on the model's device and dtypes: fresh leaves that train
        for the keys where ``trainable`` holds, constants elsewhere."""
        params = self.loaded.parameters_by_name()
        missing = [k for k in self.loaded.init_state if k not in state]
        unknown = [k for k in state if k not in self.loaded.init_state]
        if missing or unknown:
            what = f"lacks '{missing[0]}'" if missing else f"has '{unknown[0]}', not a key of this model's adapter"
            raise KeyError(f"A packed user's adapter state {what}; give each user's full composed state "
                           "(fedpeft.learning.models.composed_state)")
        values = {}
        for key in self.loaded.init_state:
            value = state[key].to(self.loaded.device, params[key].dtype)
            if trainable is not None and trainable(key):
                value = value.detach().clone().requires_grad_(True)
            values[key] = value
        return values
