"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file of a run folder that a reader may open while the run goes on (or after it was killed)
is written here: to a temporary name in the same folder, then moved into place with
``os.replace`` (safe against a killed process; no fsync, so not against a power cut). Imports
nothing of fedpeft, so every layer may use it.

The run folder's JSON files are written with :func:`json_text`, which writes NaN and infinities
(a score of nothing, a loss of no step) as ``null``, so that they are valid JSON for any reader;
:func:`json_value` reads them back with ``null`` as NaN, as the run held them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def finite_or_none(value: Any) -> Any:
    """``value`` with every float that is NaN or infinite, at any depth of dicts, lists and
    tuples, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def _number(value: Any) -> float | None:  # numpy scalars and the like: as floats
    return finite_or_none(float(value))


def json_text(value: Any, **dumps_kwargs: Any) -> str:
    """``json.dumps`` for the run folder: non-finite floats as ``null`` (strict JSON: never a bare
    ``NaN``), other numbers that are not ints or floats (numpy scalars) as floats."""
    return json.dumps(finite_or_none(value), allow_nan=False, default=_number, **dumps_kwargs)


def _nan_for_null(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _nan_for_null(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nan_for_null(v) for v in value]
    return value


def json_value(text: str) -> Any:
    """Parse a line of ``metrics.jsonl`` or ``rounds_per_user.jsonl`` (or a summary) that
    :func:`json_text` wrote: every ``null`` is NaN again (those files hold numbers and names,
    and a number is null only where it was not finite). Raises ValueError as ``json.loads``."""
    return _nan_for_null(json.loads(text))
