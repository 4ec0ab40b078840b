"""History in prompts: BM25 retrieval over a user's history (``rank_bm25``), in time order, for
LaMP/OPPU prompts, and :func:`fit_prompt`, which puts the retrieved items before the question
within a token budget without ever cutting the question for them."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from rank_bm25 import BM25Okapi


def _date_key(date: Any) -> tuple[int, ...] | None:
    if date is None:
        return None
    try:
        return tuple(int(p) for p in str(date).strip().split("-"))
    except ValueError:
        return None


def chronological(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Items sorted by date (stable), or in list order when any item has no parseable date."""
    keys = [_date_key(it.get("date")) for it in items]
    if any(k is None for k in keys):
        return list(items)
    order = sorted(range(len(items)), key=lambda i: keys[i])
    return [items[i] for i in order]


def bm25_top(query: str, docs: list[str], k: int) -> list[str]:
    """The k docs BM25Okapi ranks highest for ``query`` (rank_bm25's get_top_n)."""
    if k <= 0 or not docs:
        return []
    corpus = [d.split() for d in docs]
    if not any(corpus):
        return []
    return BM25Okapi(corpus).get_top_n(query.split(), docs, n=min(k, len(docs)))


class PrefixBM25:
    """rank_bm25's BM25Okapi over the growing prefixes ``docs[:p]`` of one tokenized corpus.

    ``model(p)`` equals ``BM25Okapi(docs[:p])`` (same term counts, document lengths, average
    length and vocabulary order, so bit-identical idf and scores; a test checks this) but is
    built incrementally: each document's term counts are computed once and rank_bm25's own
    ``_calc_idf`` runs on the prefix's document frequencies. Scoring is rank_bm25's
    ``get_scores``/``get_top_n``. This turns a user's O(n^2) re-indexing into O(n * vocabulary).
    Prefixes must be asked for in increasing order (else it falls back to a fresh BM25Okapi).
    """

    def __init__(self, docs: list[list[str]]) -> None:
        self.docs = docs
        self.full = BM25Okapi(docs) if docs else None
        self._nd: dict[str, int] = {}
        self._upto = 0
        self._words = 0

    def model(self, p: int) -> BM25Okapi | None:
        """BM25Okapi over docs[:p]; None when those documents hold no token at all."""
        if p <= 0 or self.full is None:
            return None
        if p < self._upto:
            prefix = self.docs[:p]
            return BM25Okapi(prefix) if any(prefix) else None
        for i in range(self._upto, p):
            self._words += self.full.doc_len[i]
            for word in self.full.doc_freqs[i]:
                self._nd[word] = self._nd.get(word, 0) + 1
        self._upto = p
        if self._words == 0:
            return None
        model = object.__new__(BM25Okapi)
        model.k1, model.b, model.epsilon = self.full.k1, self.full.b, self.full.epsilon
        model.tokenizer = None
        model.corpus_size = p
        model.doc_freqs = self.full.doc_freqs[:p]
        model.doc_len = self.full.doc_len[:p]
        model.avgdl = self._words / p
        model.idf = {}
        model._calc_idf(self._nd)
        return model


# ---- prompts under a token budget -------------------------------------------------------------

Layout = Callable[[str, Sequence[str]], str]  # (question, kept context pieces) -> the model's input text
ELISION = "..."  # marks the words a cut took out


def with_history(question: str, history: Sequence[str]) -> str:
    """OPPU's layout: the retrieved items (each ending in a newline), a newline, the question."""
    return "".join(history) + "\n" + question if history else question


def middle_cut(text: str, words: int) -> str:
    """``text`` with only its first ceil(words/2) and last floor(words/2) whitespace-separated
    words (``words`` >= 1), the cut marked by ``...``; the kept parts, trailing whitespace
    included, are unchanged. The start and end survive: an instruction and its answer cue, or a
    history item's field name and the target field that OPPU's templates put last
    (``description: ... tag: comedy``)."""
    spans = [m.span() for m in re.finditer(r"\S+", text)]
    if words >= len(spans):
        return text
    head, tail = (words + 1) // 2, words // 2
    end = text[spans[len(spans) - tail][0]:] if tail else text[len(text.rstrip()):]
    return f"{text[: spans[head - 1][1]]} {ELISION}{' ' if tail else ''}{end}"


def _longest_fitting(make: Callable[[int], str], most: int, fits: Callable[[str], bool]) -> str | None:
    """make(n) for the largest n in 1..most that fits (binary search; None when none does)."""
    lo, hi, best = 1, most, None
    while lo <= hi:
        mid = (lo + hi) // 2
        text = make(mid)
        if fits(text):
            best, lo = text, mid + 1
        else:
            hi = mid - 1
    return best


def fit_prompt(question: str, context: Sequence[str], count: Callable[[str], int], budget: int,
               layout: Layout = with_history) -> str:
    """``layout(question, kept)`` for the most context that fits in ``budget`` tokens.

    ``count(text)`` is the number of tokens the model reads for ``text`` (special tokens
    included), so the result is checked on the exact text, never estimated. The question is never
    cut to make room for context: context pieces are kept whole in their order (most relevant
    first) while the input fits; the first piece that does not fit whole is shortened with
    :func:`middle_cut` to the most words that fit (dropped when none do), and every later piece
    is dropped. When the question alone is over the budget, all context is dropped and the
    question itself is middle-cut to fit, keeping its start (the instruction) and its end (the
    answer cue of LaMP's templates); only when not even its first word fits is it returned whole,
    for the tokenizer's truncation to cap.
    """
    def fits(text: str) -> bool:
        return count(text) <= budget

    full = layout(question, context)
    if fits(full):
        return full
    bare = layout(question, [])
    if not fits(bare):
        cut = _longest_fitting(lambda n: layout(middle_cut(question, n), []), len(question.split()) - 1, fits)
        return cut if cut is not None else bare
    kept = 0
    while fits(layout(question, context[: kept + 1])):
        kept += 1  # stops before len(context): the full input does not fit
    whole, piece = list(context[:kept]), context[kept]
    cut = _longest_fitting(lambda n: layout(question, [*whole, middle_cut(piece, n)]), len(piece.split()) - 1, fits)
    return cut if cut is not None else layout(question, whole)
