"""On-disk store of each user's private adapter state (safetensors, atomic writes).

Flower's ``context.state`` travels with every message, so private adapters live here instead,
one file per user, in a folder that every Ray node can reach.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class AdapterStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, user_id: str) -> Path:
        """One file per user: a readable part plus a hash of the exact id, so that distinct ids
        ('a/b', 'a_b', 'A_b' on a case-insensitive file system) never share a file."""
        digest = hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:16]
        return self.root / f"{_SAFE.sub('_', user_id)[:80]}-{digest}.safetensors"

    def exists(self, user_id: str) -> bool:
        return self.path(user_id).is_file()

    def save(self, user_id: str, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
        """Write atomically: a reader sees the old file or the new one, never a partial one."""
        target = self.path(user_id)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"user_id": user_id, **(metadata or {})})
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def load(self, user_id: str) -> dict[str, torch.Tensor] | None:
        path = self.path(user_id)
        return load_file(path) if path.is_file() else None

    def bytes_stored(self, user_id: str) -> int:
        path = self.path(user_id)
        return path.stat().st_size if path.is_file() else 0


OWNER_FILE = ".fedpeft-run.json"


def check_store_is_free(root: str | Path) -> None:
    """Refuse, before anything starts, an adapter store that a run has already used: its adapters
    would silently become this run's starting point."""
    owner = Path(root) / OWNER_FILE
    if owner.is_file():
        from fedpeft.config import ConfigError

        other = json.loads(owner.read_text()).get("run_dir", "?")
        raise ConfigError(f"The adapter store {root} holds the adapters of an earlier run ({other}); a new run would "
                          "start from them. Give a new folder (output.store_dir, or a new --name), or leave "
                          "output.store_dir empty (each run then gets <run folder>/adapters).")


def claim_store(root: str | Path, run_dir: Path) -> None:
    """Mark ``root`` as the adapter store of the run in ``run_dir``."""
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / OWNER_FILE).write_text(json.dumps({"run_dir": str(run_dir)}))
