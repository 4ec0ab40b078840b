"""LaMP's seven tasks as data: labels, metrics, item fields and OPPU's prompt templates, and the
parsing of a question's input into the fields its test template needs.

:data:`TASKS` holds one :class:`LampTask` per LaMP task (``parse_task('LaMP-2')`` picks one): its
kind, labels and metrics, the profile item fields it requires, the item field that is a history
example's gold, the train/test/history/query templates (OPPU's ``OPPU_input``/``OPPU_full`` and
retrieval templates; LaMP-6's are this loader's own) and the markers where a question's text starts
in LaMP's input. :func:`extract_fields` cuts that text (LaMP-1: title and both references) out of
the input, as OPPU's ``extract_*`` helpers do. The reader of the files is
:mod:`fedpeft.data.lamp_files`, the benchmark :mod:`fedpeft.data.lamp`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fedpeft.config import ConfigError

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


def parse_task(name: str) -> LampTask:
    """'LaMP-2' (also 'LaMP_2', 'lamp-2') -> its LampTask."""
    m = re.fullmatch(r"lamp[-_ ]?([1-7])", name.strip(), flags=re.IGNORECASE)
    if not m:
        raise ConfigError(f"Unknown LaMP task '{name}'. Use lamp/LaMP-<n> with n in 1..7, e.g. data.benchmark=lamp/LaMP-2.")
    return TASKS[int(m.group(1))]



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
