"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file of a run folder that a reader may open while the run goes on (or after it was killed)
is written here: to a temporary name in the same folder, then moved into place with
``os.replace`` (safe against a killed process; no fsync, so not against a power cut). Imports
nothing of fedpeft, so every layer may use it.

A write that fails because of the storage (:data:`STORAGE_ERRNOS`: a full disk, a quota, a
read-only or failing file system) is told apart from a user's own failure by
:func:`storage_errno`; :func:`storage_failure` says it in words, with the folder's free space.

The run folder's JSON files are written with :func:`json_text`, which writes NaN and infinities
(a score of nothing, a loss of no step) as ``null``, so that they are valid JSON for any reader;
:func:`json_value` reads them back with ``null`` as NaN, as the run held them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def process_umask() -> int:
    """This process's umask (read from /proc where it can be, so that it is never changed, even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` to fill a temporary file beside ``path``, then move it into place.
    The file gets the mode an ``open()`` would give it (0666 less the umask), not ``mkstemp``'s
    0600, so that a research group sharing a file system can read each other's runs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~process_umask())
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


# writes that fail because of where they go, not because of what is written
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EIO: "input/output error of the device"}
_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors, tokenizers) report an OSError


def storage_errno(err: BaseException) -> int | None:
    """The errno of ``err`` (or of an exception it was raised from) when it is one of
    :data:`STORAGE_ERRNOS`, else None. Reads OSError's ``errno`` and the "(os error N)" that
    safetensors' errors carry in their message."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return seen.errno
        match = _OS_ERROR.search(str(seen))
        if match and int(match.group(1)) in STORAGE_ERRNOS:
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def free_space(folder: str | Path) -> str:
    """``folder``'s free space in words ("1.2 MB free of 4.0 MB"), from its nearest existing parent."""
    path = Path(folder)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def storage_failure(err: BaseException, folder: str | Path) -> tuple[int, str] | None:
    """When ``err`` is the storage's fault (:func:`storage_errno`): its errno and what went wrong
    in words, naming the folder written to (the failed file's, when the error names it, else
    ``folder``) and its free space. None for any other error."""
    code = storage_errno(err)
    if not code:
        return None
    written = getattr(err, "filename", None)  # an OSError names its file; safetensors' errors do not
    where = Path(written).parent if written else folder
    return code, f"writing to {where} failed: {STORAGE_ERRNOS[code]} ({free_space(where)})"


def read_json_fields(path: Path, fields: tuple[str, ...], missing: str,
                     damaged: Callable[[Exception], str]) -> dict[str, Any]:
    """The ``fields`` of the JSON object in ``path`` (a file fedpeft wrote: run.json, study.json),
    with the object's other keys; a missing file raises ``ValueError(missing)``, one that cannot be
    read or lacks a field ``ValueError(damaged(err))``, for the caller to turn into its error."""
    if not path.is_file():
        raise FileNotFoundError(missing)
    try:
        data = json.loads(path.read_text())
        return {**data, **{name: data[name] for name in fields}}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(damaged(err)) from None
