"""BM25 retrieval over a user's history (``rank_bm25``), in time order, for LaMP/OPPU prompts."""

from __future__ import annotations

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
