"""A synthetic personalization benchmark where sharing and personalization both matter.

Users label texts from one shared pool. A text has a topic and a tone; every (topic, tone) cell
has a consensus label, each of a few latent personas departs from the consensus on a cell with
probability ``data.persona_divergence``, and each user departs from its persona on a cell with
probability ``data.noise``. So users disagree on the same inputs (one global model cannot fit
them all), each user sees about one training example per cell (alone it has too little data),
users of the same persona could help each other and all users share the consensus cells. Everything is deterministic from
``data.seed``; one user's data is built without building the others'.
"""

from __future__ import annotations

import numpy as np

from fedpeft.data import Benchmark, Example, TaskSpec, UserData, register_benchmark

TOPICS: dict[str, list[str]] = {
    "sports": ["match", "striker", "league final", "marathon", "tennis game", "goalkeeper", "stadium crowd", "cycling race"],
    "food": ["pasta", "curry", "bakery", "sushi place", "pizza", "breakfast", "soup", "dessert menu"],
    "politics": ["election", "senate vote", "new tax bill", "campaign speech", "city council", "debate", "budget plan", "minister"],
    "tech": ["new phone", "laptop", "software update", "smartwatch", "app", "graphics card", "chatbot", "operating system"],
    "music": ["concert", "album", "guitar solo", "jazz band", "playlist", "opera", "new single", "drummer"],
    "travel": ["flight", "hotel", "train ride", "beach resort", "road trip", "airport", "cruise", "mountain hike"],
    "movies": ["film", "sequel", "documentary", "actor", "cinema", "thriller", "cartoon", "director's cut"],
    "weather": ["storm", "heatwave", "rain", "snowfall", "forecast", "sunny morning", "fog", "wind"],
}
TONES: dict[str, list[str]] = {
    "positive": ["wonderful", "brilliant", "delightful", "amazing", "lovely", "fantastic", "superb", "great"],
    "negative": ["awful", "terrible", "boring", "dreadful", "disappointing", "horrible", "annoying", "bad"],
}
TEMPLATES = [
    "I thought the {noun} was {adj}.",
    "What a {adj} {noun} today!",
    "The {noun} this week felt {adj}.",
    "Honestly, the {noun} was {adj}.",
    "Everyone says the {noun} is {adj}.",
    "That {noun} was pretty {adj}, to be fair.",
]


@register_benchmark
class SyntheticBenchmark(Benchmark):
    name = "synthetic"
    default_max_length = 32
    data_keys = ("num_users", "train_per_user", "train_per_user_min", "val_per_user", "test_per_user", "personas",
                 "persona_divergence", "noise", "num_labels", "pool_size")

    def __init__(self, config) -> None:
        super().__init__(config)
        data = config.data
        rng = np.random.default_rng([data.seed, 0])
        self.labels = tuple(f"L{i}" for i in range(data.num_labels))
        self.topics = list(TOPICS)
        self.tones = list(TONES)
        n_cells = len(self.topics) * len(self.tones)
        consensus = rng.integers(0, data.num_labels, size=n_cells)
        depart = rng.random((data.personas, n_cells)) < data.persona_divergence
        shift = rng.integers(1, data.num_labels, size=(data.personas, n_cells))  # a different label
        # personas[p, cell] -> label index
        self.personas = np.where(depart, (consensus + shift) % data.num_labels, consensus)
        self.pool = self._build_pool(rng, data.pool_size)

    def _build_pool(self, rng: np.random.Generator, size: int) -> list[tuple[str, str, int]]:
        """(id, text, cell) for ``size`` distinct texts, spread evenly over cells."""
        seen: set[str] = set()
        pool: list[tuple[str, str, int]] = []
        n_cells = len(self.topics) * len(self.tones)
        max_distinct = n_cells * 8 * 8 * len(TEMPLATES)
        size = min(size, max_distinct)
        while len(pool) < size:
            cell = len(pool) % n_cells
            topic, tone = self.topics[cell // len(self.tones)], self.tones[cell % len(self.tones)]
            text = TEMPLATES[rng.integers(len(TEMPLATES))].format(
                noun=TOPICS[topic][rng.integers(8)], adj=TONES[tone][rng.integers(8)]
            )
            if text not in seen:
                seen.add(text)
                pool.append((f"s{len(pool):05d}", text, cell))
        return pool

    def user_ids(self) -> list[str]:
        return [f"user{i:04d}" for i in range(self.config.data.num_users)]

    def split_counts(self) -> list[tuple[int, int, int]]:
        """What :meth:`load_user` gives, from the config (a pool smaller than a user's draw cuts it)."""
        data = self.config.data
        n = min(data.train_per_user + data.val_per_user + data.test_per_user, data.pool_size)
        a, b = min(data.train_per_user, n), min(data.train_per_user + data.val_per_user, n)
        return [(min(self.train_size(i), n), b - a, n - b) for i in range(data.num_users)]

    def task(self) -> TaskSpec:
        return TaskSpec(kind="classification", labels=self.labels)

    def persona_of(self, index: int) -> int:
        return int(np.random.default_rng([self.config.data.seed, 1, index]).integers(self.config.data.personas))

    def user_table(self, index: int) -> np.ndarray:
        """The user's own cell -> label table: its persona's, departed from with prob. noise."""
        data = self.config.data
        rng = np.random.default_rng([data.seed, 2, index])
        table = self.personas[self.persona_of(index)].copy()
        depart = rng.random(table.shape[0]) < data.noise
        shift = rng.integers(1, data.num_labels, size=table.shape[0])  # a label that differs
        table[depart] = (table[depart] + shift[depart]) % data.num_labels
        return table

    def load_user(self, index: int) -> UserData:
        data = self.config.data
        if not 0 <= index < data.num_users:
            raise IndexError(f"user index {index} outside 0..{data.num_users - 1}")
        table = self.user_table(index)
        rng = np.random.default_rng([data.seed, 3, index])
        sizes = (data.train_per_user, data.val_per_user, data.test_per_user)
        picks = rng.choice(len(self.pool), size=min(sum(sizes), len(self.pool)), replace=False)
        examples = [
            Example(id=sid, text=text, labels=(self.labels[table[cell]],))
            for sid, text, cell in (self.pool[i] for i in picks)
        ]
        a, b = sizes[0], sizes[0] + sizes[1]
        return UserData(f"user{index:04d}", examples[:self.train_size(index)], examples[a:b], examples[b:])  # user_ids()[index]

    def train_size(self, index: int) -> int:
        """The user's training examples: ``data.train_per_user``, or with ``data.train_per_user_min``
        > 0 a count drawn uniformly from [train_per_user_min, train_per_user] (users of different
        activity; their validation and test examples stay those of the fixed size)."""
        data = self.config.data
        if not data.train_per_user_min:
            return data.train_per_user
        low = min(data.train_per_user_min, data.train_per_user)
        return int(np.random.default_rng([data.seed, 4, index]).integers(low, data.train_per_user + 1))
