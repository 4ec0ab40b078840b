"""On-disk store of each user's private adapter state (safetensors, atomic writes).

Flower's ``context.state`` travels with every message, so private adapters live here instead, in
a folder that every Ray node can reach. The store belongs to one run (:data:`OWNER_FILE` names
it), and every file records the run and the round that wrote it:

- a user's adapter of round ``r`` is its own file (``<user>-<hash>.r<r>.safetensors``), so a
  round that never completed (the driver was killed) cannot overwrite what the last completed
  round left; a resumed run reads the round the server expects and rewrites the rest;
- a client asks for exactly the round the server expects; a missing file, a file of another run
  or of another round (a stale copy on a shared file system) is a :class:`StoreError`, that
  user's failure with the reason, never silently used.

A user keeps at most two files at a time: the one it started the round from and the new one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fedpeft.files import atomic_write, atomic_write_text

_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_ROUND = re.compile(r"\.r(\d+)\.safetensors$")
OWNER_FILE = ".fedpeft-run.json"


class StoreError(RuntimeError):
    """A user's stored adapter is missing or is not the one this run expects."""


class AdapterStore:
    def __init__(self, root: str | Path, run_id: str = "") -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.root.mkdir(parents=True, exist_ok=True)

    def base(self, user_id: str) -> str:
        """A readable part plus a hash of the exact id, so that distinct ids ('a/b', 'a_b', 'A_b'
        on a case-insensitive file system) never share a file."""
        digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]
        return f"{_SAFE.sub('_', user_id)[:80]}-{digest}"

    def path(self, user_id: str, server_round: int) -> Path:
        return self.root / f"{self.base(user_id)}.r{server_round}.safetensors"

    def rounds(self, user_id: str) -> list[int]:
        """Rounds of this user's files, oldest first (lists the folder: for tools, not clients)."""
        prefix = self.base(user_id) + ".r"
        return sorted(int(m.group(1)) for p in self.root.glob(f"{glob_escape(prefix)}*.safetensors")
                      if (m := _ROUND.search(p.name)))

    def save(self, user_id: str, state: dict[str, torch.Tensor], server_round: int, phase: str = "",
             previous_round: int = 0) -> Path:
        """Write the user's adapter of ``server_round`` atomically. ``previous_round`` is the round
        it started from: that file stays (a resumed run may need it), the one before it goes."""
        target = self.path(user_id, server_round)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        meta = {"user_id": user_id, "run_id": self.run_id, "round": str(server_round), "phase": phase,
                "previous_round": str(previous_round)}
        atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=meta))
        if previous_round:
            before = self._metadata(self.path(user_id, previous_round)).get("previous_round", "0")
            if int(before) and int(before) != server_round:
                self.path(user_id, int(before)).unlink(missing_ok=True)
        return target

    def load(self, user_id: str, server_round: int) -> dict[str, torch.Tensor] | None:
        """The user's adapter written in ``server_round`` (0: the user has not trained yet, None)."""
        if server_round <= 0:
            return None
        path = self.path(user_id, server_round)
        if not path.is_file():
            raise StoreError(f"user '{user_id}': its adapter of round {server_round} is not in the store {self.root} "
                             f"({path.name}). A worker that does not see the driver's files (output.store_dir must be "
                             "on a file system every Ray node mounts), or a stale copy on a shared file system.")
        meta = self._metadata(path)
        if self.run_id and meta.get("run_id") != self.run_id:
            raise StoreError(f"user '{user_id}': {path} was written by run {meta.get('run_id') or '?'}, not by this run "
                             f"({self.run_id}); it is never used. Give this run its own output.store_dir.")
        if meta.get("round") != str(server_round) or meta.get("user_id") != user_id:
            raise StoreError(f"user '{user_id}': {path} holds round {meta.get('round')} of user "
                             f"'{meta.get('user_id')}', not round {server_round} (a stale or copied file).")
        return load_file(path)

    def latest(self, user_id: str) -> tuple[int, dict[str, torch.Tensor] | None]:
        rounds = self.rounds(user_id)
        return (rounds[-1], load_file(self.path(user_id, rounds[-1]))) if rounds else (0, None)

    def bytes_stored(self, user_id: str, server_round: int) -> int:
        path = self.path(user_id, server_round)
        return path.stat().st_size if server_round > 0 and path.is_file() else 0

    def keep_only(self, rounds: dict[str, int]) -> None:
        """Delete every adapter file but each user's ``rounds[user]`` (the end of a run)."""
        keep = {self.path(user, r).name for user, r in rounds.items() if r > 0}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if _ROUND.search(entry.name) and entry.name not in keep:
                    os.unlink(entry.path)

    @staticmethod
    def _metadata(path: Path) -> dict[str, str]:
        if not path.is_file():
            return {}
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def store_owner(root: str | Path) -> dict[str, str] | None:
    """The store's owner file (run id, run folder, driver files); None when there is no readable one."""
    try:
        data = json.loads((Path(root) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_store_is_free(root: str | Path) -> None:
    """Refuse, before anything starts, an adapter store that holds another run's adapters: they
    would silently become this run's starting point."""
    from fedpeft.config import ConfigError

    owner = store_owner(root)
    leftovers = Path(root).is_dir() and any(Path(root).glob("*.safetensors"))
    if owner or leftovers:
        other = (owner or {}).get("run_dir", "an unknown run")
        raise ConfigError(f"The adapter store {root} holds the adapters of another run ({other}); a new run would "
                          "start from them. Give a new folder (output.store_dir, or a new --name; left empty, each "
                          f"run gets <run folder>/adapters), or continue that run with `python -m fedpeft.sim --resume {other}`.")


def check_store_writable(root: str | Path) -> None:
    """Refuse, before anything is written, an adapter store this process cannot write to (a
    read-only folder or file system, a file in its place): every user's call would fail. Probes
    the store, or the nearest folder above it that exists, with a temporary file."""
    from fedpeft.config import ConfigError

    probe_at = Path(root)
    while not probe_at.exists() and probe_at != probe_at.parent:
        probe_at = probe_at.parent
    try:
        if not probe_at.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(probe_at))
        with tempfile.TemporaryFile(dir=probe_at):
            pass
    except OSError as err:
        where = "" if probe_at == Path(root) else f" ({probe_at} cannot be written)"
        raise ConfigError(f"Cannot write the adapter store {root}: {(err.strerror or str(err)).lower()}{where}. Give "
                          "output.store_dir a folder this user can write to, or leave it empty for <run folder>/adapters.") from None


def timeout_note(root: str | Path, run_id: str, user_index: int, kind: str, server_round: int) -> Path:
    """Where a worker that ends itself after ``federation.call_timeout`` says so for the server."""
    folder = Path(root) / ".timeouts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{run_id}-{kind}-r{server_round}-u{user_index}.txt"


def claim_store(root: str | Path, run_dir: Path, run_id: str, driver_files: list[str]) -> None:
    """Mark ``root`` as the adapter store of the run ``run_id`` in ``run_dir``. Workers check this
    file at their first call: it is the probe that they see the driver's store, and it lists the
    files the driver prepared (``driver_files``) that they must see too."""
    Path(root).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(root) / OWNER_FILE, json.dumps({"run_dir": str(run_dir), "run_id": run_id,
                                                           "driver_files": driver_files}))
