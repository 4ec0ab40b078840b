"""A run's identity and its checkpoint of the last completed round, for ``--resume RUN_DIR``.

``run.json`` (written before the simulation starts) names the run: its id (recorded in every
adapter file and in the adapter store's owner file) and its W&B run id. ``checkpoint.safetensors``
is rewritten atomically after every completed round: the shared state, the server optimiser's
state (FedAdam/FedYogi moments) and, as JSON in the file's metadata, the round, what each user
has trained (rounds, the round of its stored adapter, examples processed), the failures so far
and the accounting totals. Client seeds depend only on (seed, user, round) and cohorts on
(seed, round), so continuing from a checkpoint gives exactly the uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from fedpeft.config import Config, ConfigError, merge_into, set_key
from fedpeft.config_checks import validate
from fedpeft.config_load import load_yaml
from fedpeft.federation.run_folder import (  # noqa: F401  (RunIdentity re-exported: it lived here)
    DEFAULT_STORE,
    RUN_FILE,
    RunIdentity,
    bind_store,
    run_id_of,
    saved_store_dir,
)
from fedpeft.files import atomic_write

CHECKPOINT_FILE = "checkpoint.safetensors"
CLAIM_FILE = ".fedpeft-claim.json"  # the run that uses the folder now (see claim_run_dir)
# keys that never change a run's results: a resumed run may set them differently
RESUME_MAY_CHANGE = ("wandb.mode", "output.progress", "ray.address", "ray.num_cpus", "ray.client_cpus",
                     "ray.client_gpus", "federation.call_timeout")
# the run folder itself; and where its store is now (a store that moved: its owner file and every
# adapter file must still name the run, fedpeft.federation.run_folder.bind_store)
_RESUME_SETS = ("output.dir", "output.name", "output.store_dir")


@dataclass
class Checkpoint:
    """The state after ``round`` completed rounds (0: none yet)."""

    round: int = 0
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    server: dict[str, torch.Tensor] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)

    def save(self, run_dir: Path) -> None:
        tensors = {**{f"shared/{k}": v for k, v in self.shared.items()}, **{f"server/{k}": v for k, v in self.server.items()}}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"round": str(self.round), "progress": json.dumps(self.progress)}
        atomic_write(run_dir / CHECKPOINT_FILE, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @staticmethod
    def check_present(run_dir: Path) -> None:
        """Refuse to resume a run folder whose checkpoint is missing although it recorded rounds
        (metrics.jsonl, results.json): it would start again from round 1 over them. Round 1
        alone is no proof (a run killed between its metrics line and its first checkpoint):
        starting round 1 again costs one round and gives the same results."""
        path = run_dir / CHECKPOINT_FILE
        done = recorded_rounds(run_dir)
        if path.exists() or not (done > 1 or (run_dir / "results.json").is_file()):
            return
        what = f"{done} round(s) in metrics.jsonl" if done else "a results.json"
        raise ConfigError(f"Cannot resume {run_dir}: its checkpoint {path} is missing, but the run recorded {what}; "
                          f"resuming would start again from round 1 over them. Restore {CHECKPOINT_FILE} (from a backup, "
                          "or from the folder this one was copied from) and resume again, or start a new run without "
                          "--resume (another --name).")

    @staticmethod
    def saved_round(run_dir: Path) -> int:
        """The round of the checkpoint on disk (0: none, or one that cannot be read), read from
        its metadata alone: what ``--resume`` continues after."""
        try:
            with safe_open(str(run_dir / CHECKPOINT_FILE), framework="pt") as f:
                return int((f.metadata() or {})["round"])
        except (SafetensorError, OSError, KeyError, ValueError):
            return 0

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint | None:
        path = run_dir / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
            round_, progress = int(meta["round"]), json.loads(meta["progress"])
        except (SafetensorError, OSError, KeyError, ValueError) as err:  # truncated, overwritten, not ours
            why = f"no '{err.args[0]}' in its metadata" if isinstance(err, KeyError) else str(err)
            raise ConfigError(f"{path} is damaged: it is not a whole fedpeft checkpoint ({why}). The run cannot "
                              "continue from it: start a new run (without --resume), or restore the file from a "
                              "backup and resume again.") from err
        part = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}  # noqa: E731
        return cls(round=round_, shared=part("shared/"), server=part("server/"), progress=progress)


def recorded_rounds(run_dir: Path) -> int:
    """The last round ``metrics.jsonl`` records (0: none), whatever the checkpoint holds."""
    last = 0
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except (OSError, ValueError):
        return 0
    for line in lines:
        try:
            last = max(last, int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            continue
    return last


def claim_run_dir(run_dir: Path, exist_ok: bool) -> bool:
    """Claim ``run_dir`` for this process before anything is written to it: create the folder
    (an existing one only with ``exist_ok``) and, exclusively, its :data:`CLAIM_FILE` (pid, host,
    start time), so that of two runs started at once with the same folder exactly one goes on.
    A claim of a process that is gone (a dead pid on this host) or of this process is taken over.
    Returns whether this call created the folder. Raises ConfigError when the folder cannot be
    written or another live run holds it."""
    try:
        created = _make_folder(run_dir, exist_ok)
        _take_claim(run_dir / CLAIM_FILE)
    except OSError as err:
        blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(run_dir) else ""
        why = f"{blocker} is a file, not a folder" if blocker else f"{err.strerror or err}{where}"
        raise ConfigError(f"Cannot write the run folder {run_dir}: {why}. Give --out (output.dir) a folder this "
                          "user can create and write to.") from err
    return created


def release_run_dir(run_dir: Path, remove_folder: bool = False) -> None:
    """Give up this process's claim of ``run_dir`` (and, with ``remove_folder``, the folder itself
    if nothing else is in it)."""
    path = run_dir / CLAIM_FILE
    holder = _read_claim(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
    if remove_folder:
        with contextlib.suppress(OSError):
            run_dir.rmdir()


def _make_folder(run_dir: Path, exist_ok: bool) -> bool:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir()
    except FileExistsError:
        if not exist_ok or not run_dir.is_dir():
            raise
        return False
    return True


def _read_claim(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _take_claim(path: Path) -> None:
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "run_dir": str(path.parent)}
    for _ in range(2):  # a second try after taking over a claim its run left behind
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_claim(path)
            ours = holder is not None and holder.get("host") == host and isinstance(holder.get("pid"), int)
            copied = holder is not None and holder.get("run_dir", str(path.parent)) != str(path.parent)
            if copied or (ours and (holder["pid"] == os.getpid() or not _pid_alive(holder["pid"]))):
                path.unlink(missing_ok=True)  # copied with its folder, this process's own, or a run on this host that is gone
                continue
            raise ConfigError(_in_use(path, holder)) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(mine))
        return
    raise ConfigError(_in_use(path, _read_claim(path)))


def _in_use(path: Path, holder: dict[str, Any] | None) -> str:
    who = (f"started at {holder.get('started', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')})"
           if holder else "(its claim file cannot be read)")
    return (f"The run folder {path.parent} is in use by another fedpeft run {who}; give another --name, or wait "
            f"until that run ends. If no run uses the folder any more (one that ended on another host, say), delete "
            f"{path} and start again.")


def load_run_config(run_dir: str | Path) -> Config:
    """The resolved config a run folder's ``config.yaml`` holds, with ``output.store_dir`` the
    absolute path of the folder's store (:func:`fedpeft.federation.run_folder.saved_store_dir`)."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"'{run_dir}' is not a fedpeft run folder: it has no config.yaml.")
    try:
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"it holds a {type(data).__name__}, not the mapping of config keys fedpeft writes")
        data.pop("fedpeft_version", None)
        data.pop("git_commit", None)
        saved_data = data.get("data") or {}
        if str(saved_data.get("benchmark", "")).startswith("peft-u") and "split" not in saved_data:
            saved_data["split"] = "leaked"  # written before data.split existed: PEFT-U's file splits were the only ones
        config = Config.from_dict(data)
    except (OSError, ValueError, yaml.YAMLError, ConfigError, AttributeError, TypeError) as err:
        why = " ".join(str(err).split())  # a YAML error's own lines and caret, on one line
        raise ConfigError(f"{path} is damaged: {why}. Restore config.yaml from a backup (or from the folder this one was "
                          "copied from); without it the run cannot be resumed or exported.") from None
    config.output.store_dir = str(saved_store_dir(Path(run_dir).resolve(), config.output.store_dir, run_id_of(Path(run_dir))))
    return config


def resume_config(run_dir: str | Path, config_files: list[str], overrides: list[tuple[str, Any]]) -> Config:
    """The config of ``--resume RUN_DIR``: the run folder's own, with the given files and
    overrides on top, refused if they change a key that changes results."""
    folder = Path(run_dir).resolve()
    saved = load_run_config(folder)
    identity = check_resume_folder(folder)
    wanted = copy.deepcopy(saved)
    for file in config_files:
        merge_into(wanted, load_yaml(file), where=f"in {file}")
    for key, value in overrides:
        set_key(wanted, key, value)
    validate(wanted)
    check_resumable(saved, wanted)
    wanted.output.store_dir = str(Path(wanted.output.store_dir or folder / DEFAULT_STORE).resolve())  # '': <run>/adapters
    bind_store(folder, Path(wanted.output.store_dir), identity.run_id)  # another folder's store: refused now
    wanted.output.dir, wanted.output.name = str(folder.parent), folder.name
    return wanted


def check_resume_folder(run_dir: Path) -> RunIdentity:
    """What ``--resume`` needs of a run folder beyond its config, checked before anything starts:
    a readable run.json and, where rounds were recorded, the checkpoint. Returns the identity."""
    identity = RunIdentity.read(run_dir)
    Checkpoint.check_present(run_dir)
    return identity


def final_adapter(run_dir: str | Path, user_id: str) -> dict[str, torch.Tensor] | None:
    """The private adapter a run's last completed round left for ``user_id`` (None: it never
    trained): the store file of the round the checkpoint records for that user, checked to be
    this run's."""
    from fedpeft.data import get_benchmark
    from fedpeft.federation.store import AdapterStore

    folder = Path(run_dir)
    config = load_run_config(folder)
    ckpt = Checkpoint.load(folder)
    users = get_benchmark(config).user_ids()
    final_round = ckpt.progress["last_round"][users.index(user_id)] if ckpt else 0
    return AdapterStore(config.output.store_dir, RunIdentity.read(folder).run_id).load(user_id, final_round)


def flat(config: Config) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value

    walk(config.to_dict(), "")
    return out


def check_resumable(saved: Config, wanted: Config) -> None:
    """Refuse a resumed run whose config differs from the run folder's in a key that changes results."""
    before, after = flat(saved), flat(wanted)
    differ = [k for k in before if before[k] != after.get(k) and k not in RESUME_MAY_CHANGE + _RESUME_SETS]
    if differ:
        shown = ", ".join(f"{k} ({before[k]!r} -> {after[k]!r})" for k in differ)
        raise ConfigError(f"A resumed run must keep its config, but these keys differ from the run folder's config.yaml: "
                          f"{shown}. Drop those overrides, or start a new run. Keys that may change on resume: "
                          f"{', '.join(RESUME_MAY_CHANGE)}, and output.store_dir (where the run's own store is now).")
