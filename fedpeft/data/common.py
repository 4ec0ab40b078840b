"""Helpers shared by the real-benchmark loaders: input errors, JSON reading and the disk cache.

The cache turns a benchmark's source files into one small JSON file per user plus an
``index.json`` (user ids, task spec, per-user counts, skipped users), so that a process lists
users by reading the index only and loads one user by reading one small file. A cache folder is
keyed by the source files (resolved path, size, mtime) and the options that change its content;
editing a source file or an option gives a new folder. Every file is written to a temporary name
and moved into place with ``os.replace``; the index is written last, so a folder without an
index is incomplete and is (re)built. Builders take an exclusive ``flock`` on the folder's lock
file where the file system supports it, so concurrent Ray workers build it once; where it does
not, they build the same files and the atomic moves keep every file whole.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.data import Benchmark, Example, TaskSpec, UserData
from fedpeft.files import atomic_write_text


class DataFormatError(ConfigError):
    """A benchmark source file is malformed.

    The message names the file, the record (row number / sample or question id) and the field,
    says what was received and what is allowed, and how to fix it. A subclass of
    :class:`fedpeft.config.ConfigError` (itself a ``ValueError``), so callers that report config
    errors report these the same way.
    """


def format_error(file: str | Path, record: str, field: str, received: Any, allowed: str, fix: str) -> DataFormatError:
    """Build a :class:`DataFormatError` with the standard message layout."""
    got = received if isinstance(received, str) and received.startswith("<") else repr(received)
    if len(got) > 200:
        got = got[:200] + "..."
    return DataFormatError(
        f"{file}: {record}, field '{field}': got {got}; expected {allowed}. {fix}"
    )


def label_error(file: str | Path, record: str, field: str, label: Any, allowed: tuple[str, ...] | list[str],
                fix: str = "Fix the label.") -> DataFormatError:
    """A :class:`DataFormatError` for a label outside the task's labels: names the allowed labels
    and the closest one (a typo such as 'Hatefull' is the usual cause)."""
    close = difflib.get_close_matches(str(label), [str(a) for a in allowed], n=1, cutoff=0.5)
    closest = f"; the closest is '{close[0]}'" if close else ""
    return format_error(file, record, field, label, f"one of the task's labels: {', '.join(allowed)}{closest}", fix)


class JsonObject(dict):
    """A JSON object read by :func:`read_json` with ``key_names``; ``repeated`` maps each key
    given more than once to its count (Python's json keeps the last value silently)."""

    repeated: dict[str, int] = {}


def _json_object(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj = JsonObject(pairs)
    if len(obj) != len(pairs):
        counts: dict[str, int] = {}
        for key, _ in pairs:
            counts[key] = counts.get(key, 0) + 1
        obj.repeated = {k: n for k, n in counts.items() if n > 1}
    return obj


def _first_repeated_key(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str, int] | None:
    """(keys leading to the object, the repeated key, its count) of the first object with a
    repeated key, objects nested in lists included (their keys count as one level deeper)."""
    if isinstance(value, JsonObject):
        if value.repeated:
            key, count = next(iter(value.repeated.items()))
            return path, key, count
        children = ((path + (str(k),), v) for k, v in value.items())
    elif isinstance(value, list):
        children = ((path, v) for v in value)
    else:
        return None
    for child_path, child in children:
        found = _first_repeated_key(child, child_path)
        if found:
            return found
    return None


def read_json(path: str | Path, hint: str = "", key_names: tuple[str, ...] = ()) -> Any:
    """``json.load`` with errors that name the file (and where in it the JSON breaks).

    With ``key_names`` (what the keys of an object are at each depth, e.g. ("user id", "split",
    "sample id")), a key given twice in one object is refused, naming it, where it is, and the
    file: json would keep the last and drop the others without a word.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"File '{path}' does not exist.{' ' + hint if hint else ''}")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_json_object if key_names else None)
    except json.JSONDecodeError as err:
        raise DataFormatError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}). "
            f"Re-download or re-create the file.{' ' + hint if hint else ''}"
        ) from None
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text ({err}). Re-download or re-create the file.") from None
    found = _first_repeated_key(data) if key_names else None
    if found:
        keys, key, count = found
        name = key_names[len(keys)] if len(keys) < len(key_names) else "key"
        inside = ", ".join(f"{key_names[i] if i < len(key_names) else 'key'} '{k}'" for i, k in enumerate(keys))
        raise DataFormatError(
            f"{path}: {name} '{key}' appears {count} times{' in ' + inside if inside else ''}; JSON keeps only the last "
            f"one, so the others would be dropped silently. Give each {name} once (merge or rename the "
            f"duplicates).{' ' + hint if hint else ''}"
        )
    return data


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`fedpeft.files.atomic_write_text`)."""
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False))


_CHUNKS = re.compile(r"(\d+)")


def natural_key(text: str) -> tuple:
    """Sort key ordering embedded numbers numerically: 'worker_9' < 'worker_10'."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _CHUNKS.split(text) if part)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _item_name(index: int, item: Any) -> str:
    """A list item in a path: its id where it has one (a record's "id", a row's first field)."""
    if isinstance(item, dict) and isinstance(item.get("id"), (str, int)):
        return repr(item["id"])
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], str) and not _LONE_SURROGATE.search(item[0]):
        return repr(item[0])
    return f"item {index}"


def find_lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> tuple[tuple[str, ...], str] | None:
    """(where, the text) of the first string in ``value`` (keys included) holding a lone surrogate:
    half of a UTF-16 pair, which JSON's ``\\ud800`` escapes can give but UTF-8 cannot encode."""
    if isinstance(value, str):
        return (path, value) if _LONE_SURROGATE.search(value) else None
    pairs: Iterable[tuple[str, Any]] = ()
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and _LONE_SURROGATE.search(key):
                return path + ("<key>",), key
        pairs = ((str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        pairs = ((_item_name(i, v), v) for i, v in enumerate(value))
    for name, child in pairs:
        found = find_lone_surrogate(child, path + (name,))
        if found:
            return found
    return None


def lone_surrogate_error(sources: str, obj: Any) -> DataFormatError | None:
    """The one-line error for the first lone surrogate in ``obj`` (a record about to be cached),
    naming the source files, where in the record it is, and the text around it; None if it has none."""
    found = find_lone_surrogate(obj)
    if found is None:
        return None
    path, text = found
    at = _LONE_SURROGATE.search(text).start()
    escape = f"\\u{ord(text[at]):04x}"
    snippet = text[max(0, at - 30): at + 30].encode("utf-8", "backslashreplace").decode("utf-8")  # the surrogate as \\ud800
    user = f"user {obj['user_id']!r}, " if isinstance(obj, dict) and "user_id" in obj else ""
    return DataFormatError(f"{sources}: {user}{' / '.join(path)}: the text '{snippet}' holds a lone surrogate {escape} "
                           f"at character {at} (half of a UTF-16 pair, not a character: it cannot be written as UTF-8 "
                           f"nor tokenized). Replace the {escape} escape in the source file with the character it was "
                           "meant to be (or delete it), then run again.")


def cannot_write(err: OSError, root: Path) -> bool:
    """Whether ``err`` says a path under ``root`` refuses writes (permissions, a read-only file system)."""
    refused = isinstance(err, PermissionError) or err.errno == errno.EROFS
    return refused and bool(err.filename) and Path(err.filename).resolve().is_relative_to(root.resolve())


def cache_root(config: Config) -> Path:
    """``data.cache_dir``, or ~/.cache/fedpeft when it is empty."""
    return Path(config.data.cache_dir).expanduser() if config.data.cache_dir else Path.home() / ".cache" / "fedpeft"


def source_fingerprint(paths: Iterable[str | Path]) -> list[list[Any]]:
    """[resolved path, size, mtime_ns] of each source file."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append([str(Path(p).resolve()), st.st_size, st.st_mtime_ns])
    return out


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """flock(LOCK_EX) on ``path``; a no-op where flock is unavailable (e.g. some network FS)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


class UserCache:
    """One cache folder: ``index.json`` and ``users/<shard>/<index>.json``."""

    def __init__(self, root: Path, family: str, task: str, key_material: dict[str, Any]) -> None:
        digest = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:20]
        safe_task = re.sub(r"[^A-Za-z0-9_.-]", "_", task) or "default"
        self.root = Path(root)
        self.dir = self.root / family / f"{safe_task}-{digest}"
        self.key_material = key_material

    @property
    def index_path(self) -> Path:
        return self.dir / "index.json"

    def user_path(self, index: int, suffix: str = "") -> Path:
        return self.dir / "users" / f"{index // 1000:04d}" / f"{index:07d}{suffix}.json"

    def write_user(self, index: int, obj: Any, suffix: str = "") -> None:
        try:
            atomic_write_json(self.user_path(index, suffix), obj)
        except UnicodeEncodeError:
            sources = ", ".join(str(src[0]) for src in self.key_material.get("sources", [])) or str(self.dir)
            raise lone_surrogate_error(sources, obj) or DataFormatError(
                f"{sources}: a record could not be written as UTF-8 to the cache folder {self.dir}") from None

    def read_user(self, index: int, suffix: str = "") -> Any:
        path = self.user_path(index, suffix)
        try:
            with path.open("r", encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            if suffix:
                raise
            raise ConfigError(
                f"Cache file '{path}' is missing (the cache folder '{self.dir}' was changed while in "
                "use). Delete that folder; it is rebuilt from the source files on the next run."
            ) from None

    def has_user(self, index: int, suffix: str = "") -> bool:
        return self.user_path(index, suffix).is_file()

    def load_index(self) -> dict[str, Any] | None:
        try:
            with self.index_path.open("r", encoding="utf-8") as f:
                return json.load(f)
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def get_or_build(self, build: Callable[[UserCache], dict[str, Any]]) -> dict[str, Any]:
        """The index, building the folder with ``build(self)`` (which writes the user files and
        returns the index) when no complete one exists."""
        index = self.load_index()
        if index is not None:
            return index
        try:
            with _exclusive_lock(self.dir.parent / f".{self.dir.name}.lock"):
                index = self.load_index()  # another process may have built it while we waited
                if index is not None:
                    return index
                index = build(self)
                index["cache_key"] = self.key_material
                atomic_write_json(self.index_path, index)
                return index
        except OSError as err:
            if not cannot_write(err, self.root):
                raise
            raise ConfigError(f"The processed-data cache folder {self.root} (data.cache_dir, where the benchmark's files are "
                              f"converted once) cannot be written: {err.filename}: {err.strerror}. Set data.cache_dir to a "
                              "folder you can write, e.g. data.cache_dir=/tmp/fedpeft-cache, or make that folder writable.") from None


class CachedBenchmark(Benchmark):
    """A benchmark whose index (ids, kind, labels, metrics, skipped users) and per-user files
    live in a :class:`UserCache`. Subclasses set ``self.cache`` and implement ``_build(cache)``,
    which writes every user's file and returns the index."""

    cache: UserCache
    _index: dict[str, Any] | None = None

    def _build(self, cache: UserCache) -> dict[str, Any]:
        raise NotImplementedError

    def index(self) -> dict[str, Any]:
        """Read (or build once) the index; never the users' texts."""
        if self._index is None:
            self._index = self.cache.get_or_build(self._build)
        return self._index

    def user_ids(self) -> list[str]:
        return list(self.index()["users"])

    def task(self) -> TaskSpec:
        idx = self.index()
        return TaskSpec(kind=idx["kind"], labels=tuple(idx["labels"]), metrics=tuple(idx["metrics"]))

    def skipped_users(self) -> dict[str, str]:
        return dict(self.index()["skipped"])

    def split_counts(self) -> list[tuple[int, int, int]]:
        return [(int(tr), int(va), int(te)) for tr, va, te in self.index()["counts"]]

    def driver_files(self) -> list[str]:
        self.index()
        return [str(self.cache.index_path)]

    def check_index(self, index: int) -> None:
        users = self.index()["users"]
        if not 0 <= index < len(users):
            raise IndexError(f"user index {index} outside 0..{len(users) - 1}")

    @staticmethod
    def user_data(record: dict[str, Any]) -> UserData:
        """A cached user record ({"user_id", "train"|"val"|"test": [[id, text, labels], ...]})."""
        split = {s: [Example(id=i, text=t, labels=tuple(g)) for i, t, g in record[s]] for s in ("train", "val", "test")}
        return UserData(record["user_id"], split["train"], split["val"], split["test"])
