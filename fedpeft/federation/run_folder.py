"""A run folder belongs to itself: a moved folder resumes as it is, a copy never writes into
another run's adapter store.

``config.yaml`` keeps the adapter store relative to the run folder when it lies inside it (the
default ``adapters``), so a moved or copied folder finds its own store. A store outside the
folder (``output.store_dir``) is kept as an absolute path; its owner file
(:data:`fedpeft.federation.store.OWNER_FILE`) binds it to its run id *and* its run folder's path.
:func:`bind_store` decides, when a folder resumes, whether the store is its own:

- the owner names this folder: it is;
- the owner names another folder that holds the same run and writes to this very store (a
  copied folder, both naming one outside store): refused, with both paths named;
- otherwise the store is this folder's (the folder was moved, or it is a copy with its own copy
  of the store), and the caller binds it to this folder again.

Run folders written before paths were relative hold the store as an absolute path:
:func:`saved_store_dir` still finds a moved or copied folder's own store there.

:class:`RunIdentity` (``run.json``, the run's id) lives here, under :mod:`fedpeft.federation.checkpoint`,
which re-exports it.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedpeft.config import ConfigError
from fedpeft.federation.store import OWNER_FILE, store_owner
from fedpeft.files import atomic_write_text, read_json_fields

RUN_FILE = "run.json"
DEFAULT_STORE = "adapters"  # <run folder>/adapters when output.store_dir is left empty


@dataclass
class RunIdentity:
    """``run_id`` signs every adapter file and the store's owner file; ``copied_from``: the run
    folder this one is a copy of (it then has a W&B run of its own)."""

    run_id: str
    wandb_id: str
    copied_from: str = ""

    @classmethod
    def new(cls) -> RunIdentity:
        return cls(run_id=uuid.uuid4().hex[:12], wandb_id=uuid.uuid4().hex[:8])

    def copy_of(self, original: Path) -> RunIdentity:
        """The identity of a copy of the run folder ``original``: the same run id (its adapter
        files carry it), a W&B run of its own."""
        return RunIdentity(self.run_id, uuid.uuid4().hex[:8], str(original))

    def write(self, run_dir: Path) -> None:
        data = {"run_id": self.run_id, "wandb_id": self.wandb_id, **({"copied_from": self.copied_from} if self.copied_from else {})}
        atomic_write_text(run_dir / RUN_FILE, json.dumps(data))

    @classmethod
    def read(cls, run_dir: Path) -> RunIdentity:
        path = run_dir / RUN_FILE

        def damaged(err: Exception) -> str:
            why = f"no '{err.args[0]}' in it" if isinstance(err, KeyError) else f"not the JSON fedpeft writes ({err})"
            return (f"{path} is damaged: {why}. It names the run (its id signs every adapter file), so the run cannot "
                    f"continue without it: restore {RUN_FILE} from a backup (or from the folder this one was copied "
                    "from), or start a new run without --resume.")

        try:
            data = read_json_fields(path, ("run_id", "wandb_id"), f"'{run_dir}' cannot be resumed: it has no {RUN_FILE} "
                                    "(not a fedpeft run folder, or one written before runs could be resumed).", damaged)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
        return cls(run_id=str(data["run_id"]), wandb_id=str(data["wandb_id"]), copied_from=str(data.get("copied_from", "")))


def store_setting(run_dir: Path, store_dir: str | Path) -> str:
    """What ``config.yaml`` keeps as ``output.store_dir``: relative to ``run_dir`` when the store
    lies inside it, else the absolute path."""
    store = Path(store_dir or Path(run_dir) / DEFAULT_STORE).resolve()
    try:
        return store.relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        return str(store)


def saved_store_dir(run_dir: Path, setting: str, run_id: str | None = None) -> Path:
    """The store a run folder's ``config.yaml`` names (``setting``): '' is ``<run_dir>/adapters``,
    a relative path lies inside ``run_dir``. An absolute path that is a store inside the folder
    at the place the run was first written (written before paths were relative) is the copy of
    that store inside this folder, when its owner file names that place (and ``run_id``)."""
    run_dir = Path(run_dir)
    if not setting:
        return run_dir / DEFAULT_STORE
    path = Path(setting)
    if not path.is_absolute():
        return run_dir / path
    for folder in path.parents:
        inside = run_dir / path.relative_to(folder)
        owner = store_owner(inside) or {}
        if owner.get("run_dir") == str(folder) and run_id in (None, owner.get("run_id")):
            return inside
    return path


def run_id_of(run_dir: Path) -> str | None:
    """The run id in ``run_dir``'s run.json (None: no readable one)."""
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data.get("run_id") if isinstance(data, dict) else None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _writes_to(folder: Path, run_id: str, store_dir: Path) -> bool:
    """Whether the run folder ``folder`` holds run ``run_id`` and resuming it would write to
    ``store_dir`` (a folder whose config cannot be read is taken to, unless the store lies inside
    another folder)."""
    if run_id_of(folder) != run_id:
        return False
    try:
        data = yaml.safe_load((folder / "config.yaml").read_text())
        setting = str(data["output"]["store_dir"] or "")
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return True
    return _same(saved_store_dir(folder, setting, run_id), store_dir)


def bind_store(run_dir: Path, store_dir: Path, run_id: str) -> str:
    """Check that the adapter store ``store_dir`` may be written by the run folder ``run_dir``
    (run ``run_id``) as it resumes. Returns ``"same"`` (the store names this folder), ``"moved"``
    (it names a folder that no longer holds this run) or ``"copied"`` (it names a folder that
    still holds this run, which writes elsewhere: this folder is a copy with a store of its own).
    Raises ConfigError, naming both folders, when another folder of the same run writes to it."""
    owner = store_owner(store_dir)
    if owner is None:
        raise ConfigError(f"Cannot resume {run_dir}: its adapter store {store_dir} is missing (no {OWNER_FILE} there). "
                          "If the store was moved, give its new place with output.store_dir=PATH (allowed on resume); "
                          "without it the run cannot continue: start a new run.")
    if owner.get("run_id") != run_id:
        raise ConfigError(f"Cannot resume {run_dir}: its adapter store {store_dir} belongs to run {owner.get('run_id')} "
                          f"(run folder {owner.get('run_dir', '?')}), not to this run ({run_id}). Give this run's own "
                          "store with output.store_dir=PATH, or resume that run folder instead.")
    bound = Path(str(owner.get("run_dir", "")))
    if not str(bound) or _same(bound, run_dir):
        return "same"
    if _writes_to(bound, run_id, store_dir):
        raise ConfigError(f"Cannot resume {run_dir}: its adapter store {store_dir} belongs to the run folder {bound}, "
                          f"which holds the same run ({run_id}; {run_dir} is a copy of it), and resuming the copy would "
                          f"overwrite that run's adapters. Resume {bound} itself, or copy the store too and resume the "
                          "copy with output.store_dir=PATH_OF_THAT_COPY.")
    return "copied" if run_id_of(bound) == run_id else "moved"


def own_store(run_dir: Path, store_dir: Path, identity: RunIdentity) -> RunIdentity:
    """As a run folder resumes: check that it may write its adapter store (:func:`bind_store`:
    never another folder's) and say so when the folder was moved or copied; a copy continues as a
    run of its own (its own store, its own W&B run). Returns the identity the run goes on with."""
    was = (store_owner(store_dir) or {}).get("run_dir", "")
    found = bind_store(run_dir, store_dir, identity.run_id)
    if found == "moved":
        print(f"fedpeft: {run_dir} was moved from {was}; its adapter store {store_dir} is bound to it now")
    elif found == "copied":
        print(f"fedpeft: {run_dir} is a copy of {was}: it continues as a run of its own (adapter store {store_dir}, "
              "a W&B run of its own); the original is left as it is")
        return identity.copy_of(Path(was))
    return identity
