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
both by :func:`fedpeft.learning.inputs.model_text`, the same way in training and prediction: the items
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

LaMP-6 (Avocado emails) has no OPPU template; the analogous templates in
:mod:`fedpeft.data.lamp_tasks` are this loader's.
Malformed files raise :class:`fedpeft.data.common.DataFormatError` naming the file, the question
id and the field; users that cannot be trained (no history items) are skipped with a warning and
listed by ``skipped_users()``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import warnings
from typing import Any

import numpy as np

from fedpeft.config import ConfigError
from fedpeft.data import Example, TaskSpec, UserData, register_benchmark
from fedpeft.data.common import (
    CachedBenchmark,
    UserCache,
    cache_root,
    cannot_write,
    format_error,
    source_fingerprint,
)
from fedpeft.data.lamp_files import DOWNLOAD_HINT, read_outputs, read_questions, resolve_folder
from fedpeft.data.lamp_tasks import LAMP1_TEMPLATE, LampTask, parse_task
from fedpeft.data.retrieval import PrefixBM25, bm25_top, chronological  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: repeated question and gold ids refused
EXAMPLES_VERSION = 2  # the formatted examples' layout: [id, text, [gold], [history items]]
ITEM_WORDS = 768       # OPPU: get_first_k_tokens(q[key], 768) for the example's own fields
RETRIEVED_WORDS = 368  # OPPU: get_first_k_tokens(p[key], 368) for retrieved history items


def first_words(text: str, k: int) -> str:
    """OPPU's get_first_k_tokens: the first k whitespace tokens, joined by single spaces."""
    return " ".join(text.split()[:k])


def _fill(template: str, item: dict[str, Any], words: int) -> str:
    return template.format(**{k: first_words(v, words) if isinstance(v, str) else v for k, v in item.items()})


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
