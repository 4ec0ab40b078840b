"""Export one user's final adapter as a standard peft folder.

    python -m fedpeft.export --run runs/local_only-... --user user0003 --out exported/user0003

The folder loads with ``PeftModel.from_pretrained(base, folder)`` where ``base`` is the run's
backbone (with the task's number of labels for an encoder; ``fedpeft_task.json`` in the folder
gives them). For ``peft.method=bottleneck`` run ``import fedpeft.adapters`` first: it registers
the bottleneck adapters with peft.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from fedpeft.config import Config, ConfigError
from fedpeft.data import get_benchmark, input_length
from fedpeft.models import build_model, load_adapter_state, resolve_model_path
from fedpeft.store import AdapterStore


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a fedpeft run folder: it has no config.yaml.")
    data = yaml.safe_load(path.read_text())
    data.pop("fedpeft_version", None)
    data.pop("git_commit", None)
    return Config.from_dict(data)


def export_user(run_dir: str | Path, user_id: str, out_dir: str | Path) -> Path:
    """Write ``user_id``'s personalised adapter (private + final shared part) to ``out_dir``."""
    config = load_run_config(run_dir)
    bench = get_benchmark(config)
    users = bench.user_ids()
    if user_id not in users:
        raise ConfigError(f"User '{user_id}' is not in this run's benchmark; users are e.g. {', '.join(users[:5])}.")
    labels = bench.task().labels
    loaded = build_model(config, num_labels=len(labels))
    state = dict(loaded.init_state)
    private = AdapterStore(config.output.store_dir).load(user_id)
    if private is None:
        raise ConfigError(f"User '{user_id}' has no stored adapter in {config.output.store_dir}: it never trained in this run.")
    state.update(private)
    shared_path = Path(run_dir) / "shared_final.safetensors"
    if shared_path.is_file():
        state.update(load_file(shared_path))
    load_adapter_state(loaded, state)
    out = Path(out_dir)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    task = {"user_id": user_id, "labels": list(labels), "base_model": resolve_model_path(config.model.name),
            "max_length": input_length(config), "kind": loaded.kind, "task_kind": bench.task().kind}
    (out / "fedpeft_task.json").write_text(json.dumps(task, indent=2))
    return out


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
