"""Reading and checking LaMP's official files: questions, gold outputs, and the folder holding them.

:func:`read_questions` reads ``{dev,train}_questions.json`` into checked questions (their input
cut into the task's fields, each profile item checked for the task's fields and labels);
:func:`read_outputs` reads ``{dev,train}_outputs.json`` into question id -> gold output, checked
against the task's labels; :func:`resolve_folder` finds a task's files under ``data.path``.
Malformed files raise :class:`fedpeft.data.common.DataFormatError` naming the file, the record
and the field, with :data:`DOWNLOAD_HINT` where fetching the official files is the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError
from fedpeft.data.common import DataFormatError, format_error, label_error, read_json
from fedpeft.data.lamp_tasks import LAMP2_OLD_NEWS_CATEGORIES, LAMP2_TAGS, LampTask, extract_fields

DOWNLOAD_HINT = "Download the files with `python -m fedpeft.data download lamp --task LaMP-<n> --split user --out <dir>`."


def _check_item(task: LampTask, path: Path, qid: str, pos: int, item: Any) -> dict[str, Any]:
    record = f"question id '{qid}', profile item {pos}"
    fix = f"Each LaMP-{task.number} profile item needs the fields id, {', '.join(task.fields)} (date optional)."
    if not isinstance(item, dict):
        raise format_error(path, record, "profile", type(item).__name__, "an object", fix)
    if "id" not in item:
        raise format_error(path, record, "id", f"<missing; keys: {sorted(item)}>", "the item's id", fix)
    record = f"question id '{qid}', profile item id '{item['id']}'"
    out: dict[str, Any] = {"id": str(item["id"])}
    if item.get("date") is not None:
        out["date"] = str(item["date"])
    for field in task.fields:
        if field not in item:
            raise format_error(path, record, field, f"<missing; keys: {sorted(item)}>", f"a string ({field})", fix)
        value = item[field]
        if task.number == 3 and field == "score":
            out[field] = _score_label(path, record, field, value)
        elif not isinstance(value, str):
            raise format_error(path, record, field, value, "a string", fix)
        else:
            out[field] = value
    if task.number == 2 and out["tag"] not in LAMP2_TAGS:
        raise _bad_label(task, path, record, "tag", out["tag"])
    return out


def _score_label(path: Path, record: str, field: str, value: Any) -> str:
    try:
        number = float(str(value).strip())
    except ValueError:
        number = float("nan")
    if number not in (1, 2, 3, 4, 5):
        raise format_error(path, record, field, value, "a rating 1, 2, 3, 4 or 5", "Fix the value.")
    return str(int(number))


def _bad_label(task: LampTask, path: Path, record: str, field: str, value: Any) -> DataFormatError:
    hint = "Fix the value."
    if task.number == 2 and value in LAMP2_OLD_NEWS_CATEGORIES:
        hint = ("This is a news category of the old LaMP-2 (news categorization); this loader reads the current "
                "LaMP-2 (movie tagging), served under LaMP_2/new/. " + DOWNLOAD_HINT)
    return label_error(path, record, field, value, task.labels, hint)


def _refuse_repeated_id(path: Path, what: str, qid: str, pos: int, first_position: dict[str, int]) -> None:
    """Record ``qid``'s position; a second question (or gold) with the same id is refused: it
    would overwrite or merge with the first one (a user lost, or two questions as one)."""
    if qid in first_position:
        raise format_error(path, f"{what} {pos}", "id", qid, f"an id no other {what} has (already the id of {what} "
                           f"{first_position[qid]})", "Use the official LaMP files; each question id appears once.")
    first_position[qid] = pos


def read_questions(task: LampTask, path: Path, time_split: bool) -> list[dict[str, Any]]:
    """Checked questions: [{"id", "user_id"?, "fields", "profile": [items]}] in file order."""
    data = read_json(path, hint=DOWNLOAD_HINT)
    if not isinstance(data, list):
        raise format_error(path, "top level", "<root>", type(data).__name__, "a list of questions {id, input, profile}", DOWNLOAD_HINT)
    out = []
    needed = ("id", "input", "profile") + (("user_id",) if time_split else ())
    first_position: dict[str, int] = {}
    for pos, q in enumerate(data):
        if not isinstance(q, dict):
            raise format_error(path, f"question {pos}", "<question>", type(q).__name__, "an object {id, input, profile}", DOWNLOAD_HINT)
        qid = str(q.get("id", f"<no id; position {pos}>"))
        if "id" in q:
            _refuse_repeated_id(path, "question", qid, pos, first_position)
        for key in needed:
            if key not in q:
                extra = (" The time-based split's questions carry user_id; set data.lamp_split=user for the "
                         "user-based files.") if key == "user_id" else ""
                raise format_error(path, f"question id '{qid}'", key, f"<missing; keys: {sorted(q)}>",
                                   f"the fields {', '.join(needed)}", "Use the official LaMP files." + extra)
        if not isinstance(q["input"], str):
            raise format_error(path, f"question id '{qid}'", "input", q["input"], "a string", "Use the official LaMP files.")
        if not isinstance(q["profile"], list):
            raise format_error(path, f"question id '{qid}'", "profile", type(q["profile"]).__name__, "a list of items",
                               "Use the official LaMP files.")
        fields = extract_fields(task, q["input"])
        if fields is None:
            expect = ('LaMP-1\'s question form: ...the title "<title>", which reference is related? ... [1]: "<a>" [2]: "<b>"'
                      if task.number == 1 else f"an input containing {' or '.join(repr(m) for m in task.markers)}")
            raise format_error(path, f"question id '{qid}'", "input", q["input"], expect,
                               f"Check that data.benchmark (lamp/LaMP-{task.number}) matches the files in data.path.")
        profile = [_check_item(task, path, qid, i, it) for i, it in enumerate(q["profile"])]
        rec = {"id": qid, "fields": fields, "profile": profile}
        if time_split:
            rec["user_id"] = str(q["user_id"])
        out.append(rec)
    return out


def read_outputs(task: LampTask, path: Path) -> dict[str, str]:
    """question id -> gold output, checked against the task's labels (LaMP-1..3)."""
    data = read_json(path, hint=DOWNLOAD_HINT)
    if not isinstance(data, dict) or "golds" not in data:
        raise format_error(path, "top level", "golds", type(data).__name__ if not isinstance(data, dict) else f"<missing; keys: {sorted(data)}>",
                           '{"task": "LaMP_<n>", "golds": [{"id", "output"}]}', DOWNLOAD_HINT)
    expected = f"LaMP_{task.number}"
    if "task" in data and str(data["task"]) != expected:
        raise format_error(path, "top level", "task", data["task"], f"'{expected}'",
                           f"data.path holds another task's files; point it at LaMP-{task.number}'s folder.")
    if not isinstance(data["golds"], list):
        raise format_error(path, "top level", "golds", type(data["golds"]).__name__, "a list of {id, output}", DOWNLOAD_HINT)
    golds: dict[str, str] = {}
    first_position: dict[str, int] = {}
    for pos, g in enumerate(data["golds"]):
        if not isinstance(g, dict) or "id" not in g or "output" not in g:
            raise format_error(path, f"gold {pos}", "id/output", g, "an object {id, output}", DOWNLOAD_HINT)
        gid = str(g["id"])
        _refuse_repeated_id(path, "gold", gid, pos, first_position)
        out = g["output"]
        if task.number == 3:
            out = _score_label(path, f"gold id '{gid}'", "output", out)
        elif not isinstance(out, str):
            raise format_error(path, f"gold id '{gid}'", "output", out, "a string", DOWNLOAD_HINT)
        if task.labels and out.strip() not in task.labels:
            raise _bad_label(task, path, f"gold id '{gid}'", "output", out)
        golds[gid] = out.strip() if task.labels else out
    return golds


def resolve_folder(path: str, task: LampTask) -> Path:
    if not path:
        raise ConfigError(f"data.path is empty: set it to the folder holding LaMP-{task.number}'s files "
                          f"(dev_questions.json, dev_outputs.json, ...). {DOWNLOAD_HINT}")
    p = Path(path).expanduser()
    for candidate in (p, p / f"LaMP-{task.number}", p / f"LaMP_{task.number}"):
        if (candidate / "dev_questions.json").is_file() or (candidate / "train_questions.json").is_file():
            return candidate
    if not p.is_dir():
        raise ConfigError(f"data.path='{path}' is not a folder. Give the folder holding LaMP-{task.number}'s files. {DOWNLOAD_HINT}")
    return p

