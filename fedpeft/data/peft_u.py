"""PEFT-U (Clarke et al. 2024): converters from the raw files, PEFT-U's split, and the loader.

``data.benchmark=peft-u/<task>`` reads PEFT-U's prepared per-user form from ``data.path`` (a
``.json`` file, or a folder holding ``user_data_leaked.json`` directly or in ``<task>/``)::

    {user_id: {"train"|"val"|"test": {sample_id: {"text": str, "label": [str, ...]}}}}

Users are listed in the natural order of their ids (numbers compared as numbers, as PEFT-U's
``sort_user_ids``). ``data.split`` says which examples are a user's train / val / test:
``leaked`` keeps the file's own per-user splits (PEFT-U's ``leakage=True``, where one user's test
text is in other users' training splits); ``by_text`` (the default) re-splits every user's
examples so that each text is in one split for all users, seeded by ``data.seed``
(:func:`fedpeft.data.peft_u_split.split_by_text`, PEFT-U's ``leakage=False``).
For one of PEFT-U's 13 tasks (:data:`LABELS`) the label set is the task's, whatever the data
holds; every label must be one of them (a typo such as 'Hatefull' would add a class), else the
file is refused naming the user, the sample, the label, the task's labels and the closest one;
a task name of one's own takes the sorted union of the file's labels. Data whose users (those
kept) carry fewer than two labels is refused (a one-class model scores 1.0 and learns nothing),
naming the labels found and expected. A user id or
sample id given twice in the file is refused too (JSON would keep the last silently). The task is "multilabel" when any
example has more than one label, else "classification"; its metrics are
:data:`fedpeft.learning.scoring.KIND_METRICS` of that kind, scored by :func:`fedpeft.learning.scoring.score`:
accuracy (a single-label prediction is correct when it is gold; a multi-label prediction when
its most confident label is) and macro-F1, and for multi-label tasks also example-F1, Jaccard
and PEFT-U's lenient ``accuracy_any`` (correct when any predicted label is gold).
``Example.text`` is the raw text; PEFT-U's instruction for the task is in :data:`INSTRUCTIONS`
for backbones that want a prompt. A user whose train or test split is empty cannot be trained or
scored: it is skipped with a warning and listed by ``skipped_users()``. Malformed input raises
:class:`fedpeft.data.common.DataFormatError` naming the file, the record and the field.

``python -m fedpeft.data prepare peft-u --task T --raw DIR --out DIR`` builds that form from the
raw files (:func:`prepare`) for any of PEFT-U's 13 tasks (:data:`TASKS`, registry in
:mod:`fedpeft.data.peft_u_tasks`: labels and instructions from PEFT-U's config.json, raw files,
readers), following PEFT-U's code (ChrisIsKing/Parameter-Efficient-Personalization,
``peft_u/write_data/prepare_<task>.py`` for the raw files, in :mod:`fedpeft.data.peft_u_raw`,
:mod:`fedpeft.data.peft_u_json` and :mod:`fedpeft.data.peft_u_hub`, and the latest
``peft_u/preprocess/convert_data_format.py``, ``data2dataset_splits(leakage=True)``); see
:func:`fedpeft.data.peft_u_split.split_user` for the split and where it differs from the paper's
one-line description.
It writes ``OUT/user_data_leaked.json``, ``OUT/dropped_users.json`` (users with fewer than 10
examples, id -> reason; PEFT-U drops them without a record) and PEFT-U's own
``OUT/users-with-empty-dataset-splits.json`` (kept users with an empty split).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError
from fedpeft.data import UserData, register_benchmark
from fedpeft.data.common import (
    CachedBenchmark,
    UserCache,
    atomic_write_json,
    cache_root,
    format_error,
    label_error,
    natural_key,
    read_json,
    source_fingerprint,
)
from fedpeft.data.peft_u_hub import read_measuringhatespeech  # noqa: F401
from fedpeft.data.peft_u_json import read_cockamamie, read_goemotion, read_hatexplain  # noqa: F401
from fedpeft.data.peft_u_raw import (  # noqa: F401  (re-exported: the readers and raw formats)
    SD_RESPONSE_LABELS,
    SD_SENTIMENTS,
    SD_TASK_COLUMN,
    STUDEMO_LABELS,
    SUBJECTIVE_DISCOURSE_FILE,
    TWEETEVAL_FILE,
    TWEETEVAL_LABELS,
    PersonalizedData,
    read_epic,
    read_gabhate,
    read_studemo,
    read_subjectivediscourse,
    read_tweeteval,
    read_unhealthyconversations,
    read_wikidetox,
)
from fedpeft.data.peft_u_split import SPLITS, Rows, split_by_text, split_user, split_users  # noqa: F401
from fedpeft.data.peft_u_tasks import (  # noqa: F401
    INSTRUCTIONS,
    LABELS,
    PREPARE_TASKS,
    TASKS,
    describe_tasks,
    read_raw,
)
from fedpeft.tasks import KIND_METRICS

log = logging.getLogger(__name__)

CACHE_VERSION = 4  # 2: multi-label tasks list the metrics of scoring.KIND_METRICS; 3: labels and ids checked;
# 4: data.split (by_text / leaked), the label set of one of PEFT-U's tasks is the task's
PREPARED_FILE = "user_data_leaked.json"
DROPPED_FILE = "dropped_users.json"
EMPTY_SPLITS_FILE = "users-with-empty-dataset-splits.json"

PREPARE_HINT = "Create it with `python -m fedpeft.data prepare peft-u --task <task> --raw <raw dir> --out <dir>`."


def label_meta(prepared: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """{"multi_label": bool, "label_options": sorted labels} (PEFT-U's data2label_meta)."""
    labels = [s["label"] for u in prepared.values() for split in u.values() for s in split.values()]
    return {"multi_label": any(len(lb) > 1 for lb in labels), "label_options": sorted(set().union(*labels)) if labels else []}


def check_label(file: str | Path, record: str, labels: list[str], task: str) -> None:
    """Refuse a label outside PEFT-U's label set of ``task`` (:data:`LABELS`); a task PEFT-U does
    not have keeps whatever labels its file gives."""
    allowed = LABELS.get(task)
    for label in labels if allowed else ():
        if label not in allowed:
            raise label_error(file, record, "label", label, allowed,
                              "Fix the label; a task name of your own (peft-u/<name>) keeps any labels.")


def prepare(task: str, raw_dir: str | Path | None, out_dir: str | Path, seed: int = 42, train_ratio: float = 0.8,
            drop_threshold: int = 10) -> dict[str, Any]:
    """Convert raw files to ``OUT/user_data_leaked.json`` (+ dropped / empty-split lists); returns a summary.
    Every label must be one of the task's (:func:`check_label`)."""
    data = read_raw(task, raw_dir)
    raw_files = TASKS[task].raw_files
    source = Path(raw_dir) / raw_files[0] if raw_dir is not None and len(raw_files) == 1 else f"{raw_dir} ({', '.join(raw_files)})"
    for uid, samples in data.items():
        for sid, sample in samples.items():
            check_label(source, f"user '{uid}', sample '{sid}'", sample["label"], task)
    prepared, dropped, empty = split_users(data, seed=seed, train_ratio=train_ratio, drop_threshold=drop_threshold)
    out = Path(out_dir)
    atomic_write_json(out / PREPARED_FILE, prepared)
    atomic_write_json(out / DROPPED_FILE, dropped)
    atomic_write_json(out / EMPTY_SPLITS_FILE, {"leaked": empty})
    meta = label_meta(prepared)
    return {
        "task": task,
        "out": str(out / PREPARED_FILE),
        "users_in": len(data),
        "users_kept": len(prepared),
        "users_dropped": dropped,
        "users_with_empty_split": empty,
        "examples": {s: sum(len(u[s]) for u in prepared.values()) for s in SPLITS},
        "labels": meta["label_options"],
        "kind": "multilabel" if meta["multi_label"] else "classification",
    }


# --------------------------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------------------------

def resolve_prepared_path(path: str, task: str) -> Path:
    """data.path -> the prepared JSON file (a file, DIR/user_data_leaked.json or DIR/<task>/...)."""
    if not path:
        raise ConfigError(
            f"data.path is empty: set it to PEFT-U's prepared per-user file ({PREPARED_FILE}) for '{task}' or "
            f"its folder, e.g. data.path=data/peft-u/{task}. {PREPARE_HINT}"
        )
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for candidate in (p / PREPARED_FILE, p / task / PREPARED_FILE):
            if candidate.is_file():
                return candidate
        raise ConfigError(f"data.path='{path}' is a folder without {PREPARED_FILE} (looked for {p / PREPARED_FILE} and "
                          f"{p / task / PREPARED_FILE}). {PREPARE_HINT}")
    raise ConfigError(f"data.path='{path}' does not exist. Give PEFT-U's prepared {PREPARED_FILE} or its folder. {PREPARE_HINT}")


def _read_prepared(path: Path) -> Any:
    return read_json(path, hint=PREPARE_HINT, key_names=("user id", "split", "sample id", "field"))


def _check_split(path: Path, uid: str, split: str, samples: Any, task: str) -> list[list[Any]]:
    """Validated [[sample_id, text, [labels]], ...] of one split."""
    fix = f"Each sample must be {{\"text\": str, \"label\": [str, ...]}}. {PREPARE_HINT}"
    if not isinstance(samples, dict):
        raise format_error(path, f"user '{uid}'", split, type(samples).__name__, "an object {sample_id: {text, label}}", fix)
    rows = []
    for sid, sample in samples.items():
        record = f"user '{uid}', {split} sample '{sid}'"
        if not isinstance(sample, dict):
            raise format_error(path, record, "<sample>", type(sample).__name__, "an object with 'text' and 'label'", fix)
        for key in ("text", "label"):
            if key not in sample:
                raise format_error(path, record, key, f"<missing; keys: {sorted(sample)}>", "an object with 'text' and 'label'", fix)
        if not isinstance(sample["text"], str):
            raise format_error(path, record, "text", sample["text"], "a string", fix)
        label = sample["label"]
        if not isinstance(label, list) or not label or not all(isinstance(x, str) and x for x in label):
            raise format_error(path, record, "label", label, "a non-empty list of non-empty strings, e.g. [\"Hateful\"]", fix)
        check_label(path, record, label, task)
        rows.append([str(sid), sample["text"], list(label)])
    return rows


def _clash(rows: Rows) -> str | None:
    """Why a user of the file is unusable because a sample id of it is in two of its splits (None: none is)."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for sid, _, _ in rows[split]:
            if sid in seen:
                return f"sample '{sid}' is in both {seen[sid]} and {split}"
            seen[sid] = split
    return None


def task_labels(task: str, found: set[str], path: str | Path) -> list[str]:
    """The label set of ``task``: PEFT-U's own for one of its tasks (:data:`LABELS`, whatever the
    data holds), else the sorted labels ``found``. Refuses data whose kept users carry fewer than
    two labels: a model with one class to predict trains to loss 0 and scores 1.0."""
    expected = LABELS.get(task)
    if len(found) < 2:
        got = ", ".join(f"'{lb}'" for lb in sorted(found)) or "none"
        of = f"the task's labels are {', '.join(expected)}" if expected else "a task of your own takes its labels from the data"
        raise ConfigError(f"PEFT-U {task}: the users kept from {path} carry only {len(found)} label(s) ({got}); {of}. "
                          "A model with fewer than two labels to tell apart learns nothing (loss 0, accuracy 1.0). Give "
                          "data in which at least two labels occur.")
    return sorted(expected) if expected else sorted(found)


@register_benchmark
class PeftUBenchmark(CachedBenchmark):
    """``peft-u/<task>``: PEFT-U's prepared per-user file, cached one file per user."""

    name = "peft-u"
    has_tasks = True
    tasks = LABELS  # PEFT-U's 13 tasks -> their label sets (a prepared file's labels must be among them)

    data_keys = ("split",)

    def __init__(self, config) -> None:
        super().__init__(config)
        if not self.task_name:
            raise ConfigError("data.benchmark='peft-u' needs a task: peft-u/<task>, e.g. peft-u/tweeteval. "
                              f"PEFT-U's tasks: {describe_tasks()}.")
        self.path = resolve_prepared_path(config.data.path, self.task_name)
        split = {"split": config.data.split} | ({"split_seed": config.data.seed} if config.data.split == "by_text" else {})
        self.cache = UserCache(cache_root(config), self.name, self.task_name, {
            "version": CACHE_VERSION, "family": self.name, "task": self.task_name,
            "sources": source_fingerprint([self.path]), **split,
        })

    def _read_users(self) -> dict[str, Rows]:
        """Every user of the file (natural order of ids) -> its checked rows per split, as the file splits them."""
        path = self.path
        data = _read_prepared(path)
        if not isinstance(data, dict):
            raise format_error(path, "top level", "<root>", type(data).__name__,
                               "an object {user_id: {train|val|test: {sample_id: {text, label}}}}", PREPARE_HINT)
        users: dict[str, Rows] = {}
        for uid in sorted(data, key=lambda u: natural_key(str(u))):
            record = data[uid]
            if not isinstance(record, dict):
                raise format_error(path, f"user '{uid}'", "<user>", type(record).__name__, "an object with train, val, test", PREPARE_HINT)
            for split in SPLITS:
                if split not in record:
                    raise format_error(path, f"user '{uid}'", split, f"<missing; keys: {sorted(record)}>",
                                       "an object with the keys train, val and test (each possibly empty {})", PREPARE_HINT)
            users[str(uid)] = {s: _check_split(path, str(uid), s, record[s], self.task_name) for s in SPLITS}
        return users

    def _build(self, cache: UserCache) -> dict[str, Any]:
        path = self.path
        read = self._read_users()
        clashes = {uid: why for uid, rows in read.items() if (why := _clash(rows))}  # in the file itself
        splits = split_by_text(read, self.config.data.seed) if self.config.data.split == "by_text" else read
        labels: set[str] = set()
        multi = False
        users: list[str] = []
        counts: list[list[int]] = []
        skipped: dict[str, str] = {}
        for uid, rows in splits.items():
            if not rows["train"] or not rows["test"]:
                skipped[uid] = f"empty {' and '.join(s for s in ('train', 'test') if not rows[s])} split"
                continue
            if uid in clashes:
                skipped[uid] = clashes[uid]
                continue
            for split_rows in rows.values():
                for _, _, lb in split_rows:
                    labels.update(lb)
                    multi = multi or len(lb) > 1
            cache.write_user(len(users), {"user_id": uid, **rows})
            users.append(uid)
            counts.append([len(rows[s]) for s in SPLITS])
        if skipped:
            shown = ", ".join(f"{u} ({r})" for u, r in list(skipped.items())[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            warnings.warn(f"PEFT-U {self.task_name}: skipped {len(skipped)} user(s) of {path}: {shown}{more}.", stacklevel=2)
        if not users:
            raise ConfigError(f"PEFT-U {self.task_name}: no usable user in {path} (every user has an empty train or test "
                              f"split with data.split={self.config.data.split}).")
        kind = "multilabel" if multi else "classification"
        return {
            "version": CACHE_VERSION, "family": self.name, "task": self.task_name, "source": str(path),
            "split": self.config.data.split, "kind": kind, "labels": task_labels(self.task_name, labels, path),
            "metrics": list(KIND_METRICS[kind]), "users": users, "counts": counts, "skipped": skipped,
        }

    def load_user(self, index: int) -> UserData:
        self.check_index(index)
        rec = self.cache.read_user(index)
        return self.user_data(rec)
