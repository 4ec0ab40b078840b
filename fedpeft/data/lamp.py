"""LaMP (Salemi et al. 2023): users, OPPU-style training examples from history, BM25, download.

``data.benchmark=lamp/LaMP-<n>`` reads the official files from the folder ``data.path`` (or its
``LaMP-<n>/`` subfolder): ``{dev,train}_questions.json`` (a list of ``{"id", "input", "profile":
[items]}``, plus ``"user_id"`` in the time-based split) and ``{dev,train}_outputs.json``
(``{"task": "LaMP_<n>", "golds": [{"id", "output"}]}``); ``data.lamp_questions`` picks which.

Users. ``data.lamp_split=user``: one question is one user (user id = question id) whose history
is the question's profile. ``time``: questions are grouped by ``user_id``; the user's history is
the union of its questions' profiles (by item id) and its test split all its questions; each
question retrieves from its own profile. A user's test split is its question(s) with the gold
output; its train split its history items turned into task-format examples as OPPU does
(TamSiuhin/OPPU, ``OPPU.py`` with the ``OPPU_input``/``OPPU_full`` templates of
``prompt/prompt.json``): the input template filled with the item's fields, the gold the item's
target field (LaMP-2 tag, LaMP-3 score, LaMP-4/5/6 title, LaMP-7 the tweet itself after the bare
prompt ``tweet:``). Its val split is empty: as in OPPU all history trains the personal adapter.
A question's input is rewritten into the same template as the training examples (its text is
cut out of LaMP's input at the task's marker, as OPPU's ``extract_*`` helpers do), so training
and test inputs share one format. String fields are cut to their first 768 whitespace tokens
(retrieved items' fields to 368), as OPPU's ``get_first_k_tokens``.

LaMP-1 history items (a user's own papers) carry no label and OPPU's citation template refers to
a field the official files lack, so examples are built deterministically from the user's own
items, in LaMP-1's question format: for the item at position i (time order), among the items
before it the one most similar by BM25 (title + abstract) is the related reference and another
one, drawn with a generator seeded by (data.seed, user, item), the unrelated one; the order of
the two options is drawn from the same generator; the gold is ``[1]`` or ``[2]``. The first two
items have too few earlier items and give no example; a user with fewer than 3 items is skipped.

Retrieval (``data.retrieval_k`` > 0), as OPPU: each history item is rendered with the task's
history template, BM25Okapi (``rank_bm25``) ranks them for the task's query template filled with
the example's input fields (whitespace tokens), and the top k rendered items, best first, are the
example's ``history``; ``Example.text`` stays the input alone. What the model reads is built from
both by :func:`fedpeft.learning.training.model_text`, the same way in training and prediction: the items
concatenated, a newline, the input (OPPU's layout), within ``data.max_length`` tokens, where the
items give way first (the lowest-ranked are dropped, the first one that does not fit whole is cut
in the middle, keeping its start and its target field) and the input is never cut for them (see
:func:`fedpeft.data.retrieval.fit_prompt`, also for an input over the budget on its own). A
training example retrieves only from the items
*before* it in time order (dates ``YYYY[-MM[-DD]]`` sorted stably; list order when an item of
the user has no parseable date), never from itself or later items; a test question from its whole
profile. OPPU retrieves nothing for LaMP-7 training examples (their query would hold the target
tweet itself) and neither does this loader; OPPU also skips LaMP-1, which here does retrieve
(its query is the example's own title, never the gold). Tokens are ``str.split()`` (OPPU:
``split(' ')``).

LaMP-6 (Avocado emails) has no OPPU template; the analogous templates below are this loader's.
Malformed files raise :class:`fedpeft.data.common.DataFormatError` naming the file, the question
id and the field; users that cannot be trained (no history items) are skipped with a warning and
listed by ``skipped_users()``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import ConfigError
from fedpeft.data import Example, TaskSpec, UserData, register_benchmark
from fedpeft.data.common import (
    CachedBenchmark,
    DataFormatError,
    UserCache,
    cache_root,
    cannot_write,
    format_error,
    label_error,
    read_json,
    source_fingerprint,
)
from fedpeft.data.retrieval import PrefixBM25, bm25_top, chronological  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: repeated question and gold ids refused
EXAMPLES_VERSION = 2  # the formatted examples' layout: [id, text, [gold], [history items]]
ITEM_WORDS = 768       # OPPU: get_first_k_tokens(q[key], 768) for the example's own fields
RETRIEVED_WORDS = 368  # OPPU: get_first_k_tokens(p[key], 368) for retrieved history items

LAMP2_TAGS = ("sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy", "classic",
              "psychology", "fantasy", "romance", "thought-provoking", "social commentary", "violence", "true story")
# LaMP-2 before the 2024 update (news categorization, LaMP's eval/evaluation.py): used only to
# recognise those files and say so.
LAMP2_OLD_NEWS_CATEGORIES = ("food & drink", "sports", "education", "parents", "religion", "travel", "business", "crime",
                             "science & technology", "culture & arts", "entertainment", "politics", "women",
                             "style & beauty", "healthy living")
_TAG_LIST = "[" + ", ".join(LAMP2_TAGS) + "]"
LAMP1_TEMPLATE = ('For an author who has written the paper with the title "{title}", which reference is related? '
                  'Just answer with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"')


@dataclass(frozen=True)
class LampTask:
    number: int
    kind: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...]
    fields: tuple[str, ...]      # required profile item fields
    target: str | None           # the item field that is a history example's gold (None: LaMP-1)
    train_template: str          # a history item -> input (OPPU_input)
    test_template: str           # a question's extracted fields -> input
    history_template: str        # a retrieved item (OPPU retrieval_history)
    query_template: str          # BM25 query (OPPU retrieval_query)
    markers: tuple[str, ...]     # where the question's text starts in LaMP's input (first found wins)
    article_field: str           # the field the question's text fills
    train_retrieval: bool = True


TASKS: dict[int, LampTask] = {
    1: LampTask(
        1, "classification", ("[1]", "[2]"), ("accuracy", "macro_f1"), ("title", "abstract"), None,
        LAMP1_TEMPLATE, LAMP1_TEMPLATE, "paper title: {title}\n",
        "Identify the most relevant reference for the listed publication by the researcher. Select the reference "
        "paper that is most closely related to the researcher's work. Please respond with only the number that "
        "corresponds to the reference.\npaper title: {title}",
        (), "title"),
    2: LampTask(
        2, "classification", LAMP2_TAGS, ("accuracy", "macro_f1"), ("description", "tag"), "tag",
        "Which tag does this movie relate to among the following tags? Just answer with the tag name without further "
        f"explanation. tags: {_TAG_LIST}\n description: {{description}} tag:",
        "Which tag does this movie relate to among the following tags? Just answer with the tag name without further "
        f"explanation. tags: {_TAG_LIST}\n description: {{description}} tag:",
        "description: {description} tag: {tag}\n",
        "Which tag does this movie relate to among the following tags? Just answer with the tag name without further "
        "explanation.\n description: {description}",
        ("] description: ", "description:"), "description"),
    3: LampTask(
        3, "rating", ("1", "2", "3", "4", "5"), ("mae", "rmse"), ("text", "score"), "score",
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without "
        "further explanation. review: {text}\n score:",
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without "
        "further explanation. review: {text}\n score:",
        "review: {text} score: {score}\n",
        "What is the score of the following review on a scale of 1 to 5? review: {text}",
        ("without further explanation. review: ", "review:"), "text"),
    4: LampTask(
        4, "generation", (), ("rouge1", "rougeL"), ("title", "text"), "title",
        "Generate a headline for the following article.\n article: {text} headline:",
        "Generate a headline for the following article.\n article: {text} headline:",
        "article: {text} headline: {title}\n",
        "Generate a headline for the following article: {text}",
        ("Generate a headline for the following article: ", "article:"), "text"),
    5: LampTask(
        5, "generation", (), ("rouge1", "rougeL"), ("title", "abstract"), "title",
        "Generate a title for the following abstract of a paper.\n abstract: {abstract} title:",
        "Generate a title for the following abstract of a paper.\n abstract: {abstract} title:",
        "abstract: {abstract} title: {title}\n",
        "Generate a title for the following abstract of a paper: {abstract}",
        ("Generate a title for the following abstract of a paper: ", "paper:", "abstract:"), "abstract"),
    6: LampTask(  # no OPPU template for the Avocado emails: analogous ones
        6, "generation", (), ("rouge1", "rougeL"), ("text", "title"), "title",
        "Generate a subject for the following email.\n email: {text} subject:",
        "Generate a subject for the following email.\n email: {text} subject:",
        "email: {text} subject: {title}\n",
        "Generate a subject for the following email: {text}",
        ("Generate a subject for the following email: ", ":"), "text"),
    7: LampTask(
        7, "generation", (), ("rouge1", "rougeL"), ("text",), "text",
        "tweet:",
        "Paraphrase the following text into tweet without any explanation before or after it.\n text: {text} tweet:",
        "tweet: {text}\n",
        "Paraphrase the following text into tweet without any explanation before or after it: {text}",
        ("Paraphrase the following tweet without any explanation before or after it: ", ":"), "text",
        train_retrieval=False),
}

DOWNLOAD_HINT = "Download the files with `python -m fedpeft.data download lamp --task LaMP-<n> --split user --out <dir>`."


def parse_task(name: str) -> LampTask:
    """'LaMP-2' (also 'LaMP_2', 'lamp-2') -> its LampTask."""
    m = re.fullmatch(r"lamp[-_ ]?([1-7])", name.strip(), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"Unknown LaMP task '{name}'. Use lamp/LaMP-<n> with n in 1..7, e.g. data.benchmark=lamp/LaMP-2.")
    return TASKS[int(m.group(1))]


def first_words(text: str, k: int) -> str:
    """OPPU's get_first_k_tokens: the first k whitespace tokens, joined by single spaces."""
    return " ".join(text.split()[:k])


def _fill(template: str, item: dict[str, Any], words: int) -> str:
    return template.format(**{k: first_words(v, words) if isinstance(v, str) else v for k, v in item.items()})


# --------------------------------------------------------------------------------------------
# Parsing a question's input
# --------------------------------------------------------------------------------------------

_LAMP1_RE = re.compile(r'the title "(?P<title>.*?)", which reference is related\?.*?\[1\]: "(?P<ref1>.*?)"\s*\[2\]: "(?P<ref2>.*)"\s*$',
                       re.DOTALL)


def _quoted(text: str) -> list[str]:
    """LaMP's extract_strings_between_quotes."""
    out, inside, cur = [], False, ""
    for ch in text:
        if ch == '"':
            if inside:
                out.append(cur)
                cur = ""
            inside = not inside
        elif inside:
            cur += ch
    return out


def extract_fields(task: LampTask, text: str) -> dict[str, str] | None:
    """The fields the test template needs, cut out of LaMP's question input (None if not found)."""
    if task.number == 1:
        m = _LAMP1_RE.search(text)
        if m:
            return {"title": m.group("title"), "ref1": m.group("ref1"), "ref2": m.group("ref2")}
        quoted = _quoted(text)
        return {"title": quoted[0], "ref1": quoted[1], "ref2": quoted[2]} if len(quoted) >= 3 else None
    for marker in task.markers:
        pos = text.find(marker)
        if pos != -1:
            return {task.article_field: text[pos + len(marker):].strip()}
    return None


# --------------------------------------------------------------------------------------------
# Reading and checking the files
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------

def lamp1_history_examples(items: list[dict[str, Any]], seed: int, user_id: str) -> list[tuple[int, dict[str, Any], str, str]]:
    """(position, item, input text, gold) for LaMP-1 history items (in time order), each built
    from the user's items before it."""
    out = []
    docs = [f"{it['title']} {it['abstract']}".split() for it in items]
    index = PrefixBM25(docs)
    for pos in range(2, len(items)):
        item = items[pos]
        earlier = list(range(pos))
        model = index.model(pos)  # the items before this one only
        best = earlier[int(np.argmax(model.get_scores(docs[pos])))] if model is not None else earlier[-1]
        rng = random.Random(f"lamp1:{seed}:{user_id}:{item['id']}")
        other = rng.choice([i for i in earlier if i != best])
        first = rng.random() < 0.5
        ref1, ref2 = (items[best], items[other]) if first else (items[other], items[best])
        fields = {"title": first_words(item["title"], ITEM_WORDS), "ref1": first_words(ref1["title"], ITEM_WORDS),
                  "ref2": first_words(ref2["title"], ITEM_WORDS)}
        out.append((pos, item, LAMP1_TEMPLATE.format(**fields), "[1]" if first else "[2]"))
    return out


def build_user_examples(task: LampTask, raw: dict[str, Any], k: int, seed: int) -> dict[str, Any]:
    """The user's train/test examples (as [id, text, [gold], [retrieved items]] rows) from its
    cached raw record."""
    items = raw["profile"]  # already in time order
    rendered = [_fill(task.history_template, it, RETRIEVED_WORDS) for it in items]
    train = []
    if task.number == 1:
        built = lamp1_history_examples(items, seed, raw["user_id"])
    else:
        built = [(pos, it, _fill(task.train_template, it, ITEM_WORDS), it[task.target]) for pos, it in enumerate(items)]
    index = PrefixBM25([r.split() for r in rendered]) if k > 0 and task.train_retrieval else None
    for pos, item, text, gold in built:
        model = index.model(pos) if index is not None else None  # BM25 over the items before this one
        history: list[str] = []
        if model is not None:
            query = _fill(task.query_template, item, ITEM_WORDS).split()
            history = model.get_top_n(query, rendered[:pos], n=min(k, pos))
        train.append([item["id"], text, [gold], history])
    test = []
    by_id = {it["id"]: r for it, r in zip(items, rendered)}
    for q in raw["questions"]:
        fields = {f: first_words(v, ITEM_WORDS) for f, v in q["fields"].items()}
        history = []
        if k > 0:
            ids = q["profile_ids"] if q["profile_ids"] is not None else [it["id"] for it in items]
            history = bm25_top(task.query_template.format(**fields), [by_id[i] for i in ids], k)
        test.append([q["id"], task.test_template.format(**fields), [q["output"]], history])
    return {"user_id": raw["user_id"], "train": train, "val": [], "test": test}


# --------------------------------------------------------------------------------------------
# Benchmark
# --------------------------------------------------------------------------------------------

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


@register_benchmark
class LampBenchmark(CachedBenchmark):
    """``lamp/LaMP-<n>``: users from LaMP's questions, cached one file per user."""

    name = "lamp"
    has_tasks = True
    data_keys = ("lamp_split", "lamp_questions", "retrieval_k")
    default_max_length = 512  # OPPU's instruction templates are long; retrieved history gives way first

    def __init__(self, config) -> None:
        super().__init__(config)
        self.spec = parse_task(self.task_name)
        data = config.data
        if data.retrieval_k < 0:
            raise ConfigError(f"data.retrieval_k={data.retrieval_k} must be >= 0 (0 turns retrieval off).")
        self.split = data.lamp_split
        self.which = data.lamp_questions
        folder = resolve_folder(data.path, self.spec)
        self.questions_path = folder / f"{self.which}_questions.json"
        self.outputs_path = folder / f"{self.which}_outputs.json"
        for p in (self.questions_path, self.outputs_path):
            if not p.is_file():
                raise ConfigError(f"LaMP-{self.spec.number}: '{p}' does not exist (data.lamp_questions={self.which} reads "
                                  f"{self.which}_questions.json and {self.which}_outputs.json from data.path). {DOWNLOAD_HINT}")
        self.cache = UserCache(cache_root(config), self.name, f"LaMP-{self.spec.number}-{self.split}-{self.which}", {
            "version": CACHE_VERSION, "family": self.name, "task": self.spec.number, "split": self.split,
            "questions": self.which, "sources": source_fingerprint([self.questions_path, self.outputs_path]),
        })


    def _build(self, cache: UserCache) -> dict[str, Any]:
        task = self.spec
        time_split = self.split == "time"
        questions = read_questions(task, self.questions_path, time_split)
        golds = read_outputs(task, self.outputs_path)
        for q in questions:
            if q["id"] not in golds:
                raise format_error(self.outputs_path, f"question id '{q['id']}'", "golds", "<no gold output with this id>",
                                   f"one {{id, output}} per question of {self.questions_path}",
                                   "Use the questions and outputs files of the same LaMP task and split.")
            q["output"] = golds[q["id"]]
        groups: dict[str, list[dict[str, Any]]] = {}
        for q in questions:
            groups.setdefault(q["user_id"] if time_split else q["id"], []).append(q)
        users: list[str] = []
        counts: list[list[int]] = []
        skipped: dict[str, str] = {}
        min_items = 3 if task.number == 1 else 1
        for uid, qs in groups.items():
            union: dict[str, dict[str, Any]] = {}
            for q in qs:
                for it in q["profile"]:
                    union.setdefault(it["id"], it)
            items = chronological(list(union.values()))
            if len(items) < min_items:
                skipped[uid] = (f"{len(items)} profile item(s): LaMP-1 needs 3 to build a training example"
                                if task.number == 1 else "no profile items: nothing to train on")
                continue
            raw = {
                "user_id": uid,
                "profile": items,
                "questions": [{"id": q["id"], "fields": q["fields"], "output": q["output"],
                               "profile_ids": [it["id"] for it in q["profile"]] if time_split else None} for q in qs],
            }
            cache.write_user(len(users), raw)
            users.append(uid)
            counts.append([len(items) - (2 if task.number == 1 else 0), 0, len(qs)])
        if skipped:
            shown = ", ".join(f"{u} ({r})" for u, r in list(skipped.items())[:10])
            more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
            warnings.warn(f"LaMP-{task.number}: skipped {len(skipped)} user(s) of {self.questions_path}: {shown}{more}.",
                          stacklevel=2)
        if not users:
            raise ConfigError(f"LaMP-{task.number}: no usable user in {self.questions_path}.")
        return {
            "version": CACHE_VERSION, "family": self.name, "task": f"LaMP-{task.number}", "split": self.split,
            "questions": self.which, "kind": task.kind, "labels": list(task.labels), "metrics": list(task.metrics),
            "users": users, "counts": counts, "skipped": skipped,
        }

    def task(self) -> TaskSpec:
        """LaMP scores are corpus-level: over all questions pooled, not a mean over users."""
        return dataclasses.replace(super().task(), corpus_metrics=True)

    def load_user(self, index: int) -> UserData:
        self.check_index(index)
        k, seed = self.config.data.retrieval_k, self.config.data.seed
        suffix = f".k{k}.s{seed}.e{EXAMPLES_VERSION}"  # examples depend on retrieval_k (and, LaMP-1, on the seed)
        if self.cache.has_user(index, suffix):
            rec = self.cache.read_user(index, suffix)
        else:
            rec = build_user_examples(self.spec, self.cache.read_user(index), k, seed)
            try:
                self.cache.write_user(index, rec, suffix)
            except OSError as err:  # a read-only cache, built elsewhere: the examples are built again each time
                if not cannot_write(err, self.cache.root):
                    raise
        return user_examples(rec)


def user_examples(record: dict[str, Any]) -> UserData:
    """A formatted user record ({"user_id", "train"|"val"|"test": [[id, text, [gold], [history]]]})."""
    split = {s: [Example(id=i, text=t, labels=tuple(g), history=tuple(h)) for i, t, g, h in record[s]]
             for s in ("train", "val", "test")}
    return UserData(record["user_id"], split["train"], split["val"], split["test"])
