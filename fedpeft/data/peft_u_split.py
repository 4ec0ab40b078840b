"""PEFT-U's two splits, as its latest ``data2dataset_splits`` makes them (ChrisIsKing/
Parameter-Efficient-Personalization, ``peft_u/preprocess/convert_data_format.py``).

``leakage=True`` (:func:`split_user`, :func:`split_users`; what ``prepare`` writes and what
``data.split=leaked`` reads): each user's examples are split on their own, per label, so one
user's test text can be in another user's training split. ``leakage=False``
(:func:`split_by_text`; ``data.split=by_text``): every text goes to one split for all users,
so no user's validation or test text is in anyone's training split.
"""

from __future__ import annotations

import random
import unicodedata
from typing import Any

from fedpeft.data.peft_u_raw import PersonalizedData

SPLITS = ("train", "val", "test")
Rows = dict[str, list[list[Any]]]  # split -> [[sample id, text, [labels]], ...] (the loader's rows)


def _split_label(samples: list, seed: int, train_ratio: float) -> tuple[list, list, list]:
    """PEFT-U's ``_split2train_val_test``: the generator is re-seeded for every call; the last
    ``max(2, round((1 - train_ratio) n))`` are held out, the first half of those (rounded) is val."""
    samples = list(samples)
    random.Random(seed).shuffle(samples)  # == random.seed(seed); random.shuffle(samples)
    n_held = max(2, round((1 - train_ratio) * len(samples)))
    train, held = samples[:-n_held], samples[-n_held:]
    n_val = round(0.5 * n_held)
    return train, held[:n_val], held[n_val:]


def split_user(samples: dict[str, dict[str, Any]], seed: int = 42, train_ratio: float = 0.8) -> dict[str, dict[str, Any]]:
    """One user's examples -> {"train", "val", "test"}, exactly as PEFT-U's latest code does.

    For each label of the user (sorted), the user's examples carrying it (in input order) are
    shuffled with ``random.seed(42)`` set anew for that label; the *last*
    ``max(2, round(0.2 n))`` of them are held out, of which the first ``round(0.5 * held)`` go to
    val and the rest to test (Python rounds halves to even: 3 held -> 2 val + 1 test, 5 -> 2 + 3);
    the others go to train. A multi-label example goes to the split chosen for it by the first
    of its labels that places it (train checked before test before val within a label), so it is
    in one split only. Differences from the paper's one-line description ("80/10/10, at least 2
    held-out per label"): the held-out pair is not guaranteed to be one val + one test for a label
    with a single example (it lands in val, test stays empty), a multi-label example counted for
    several labels can leave a label with fewer held-out examples, and the rounding is banker's.
    """
    labels = sorted(set().union(*[s["label"] for s in samples.values()])) if samples else []
    train: dict[str, Any] = {}
    val: dict[str, Any] = {}
    test: dict[str, Any] = {}
    for label in labels:
        tr, vl, ts = _split_label([(sid, s) for sid, s in samples.items() if label in s["label"]], seed, train_ratio)
        train.update({sid: s for sid, s in tr if sid not in val and sid not in test})
        test.update({sid: s for sid, s in ts if sid not in train and sid not in val})
        val.update({sid: s for sid, s in vl if sid not in train and sid not in test})
    assert len(train) + len(val) + len(test) == len(samples)
    return {"train": train, "val": val, "test": test}


def split_users(
    data: PersonalizedData, seed: int = 42, train_ratio: float = 0.8, drop_threshold: int = 10
) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str], dict[str, dict[str, int]]]:
    """(prepared form, dropped users id -> reason, kept users with an empty split -> sizes).

    Users are split in input order; a user with fewer than ``drop_threshold`` examples (counted
    over all splits, after the split, as PEFT-U does) is dropped and listed with its count.
    """
    prepared: dict[str, dict[str, dict[str, Any]]] = {}
    dropped: dict[str, str] = {}
    empty: dict[str, dict[str, int]] = {}
    for uid, samples in data.items():
        if len(samples) < drop_threshold:
            dropped[str(uid)] = f"{len(samples)} examples (< {drop_threshold})"
            continue
        prepared[str(uid)] = split_user(samples, seed=seed, train_ratio=train_ratio)
        sizes = {k: len(v) for k, v in prepared[str(uid)].items()}
        if any(n == 0 for n in sizes.values()):
            empty[str(uid)] = sizes
    return prepared, dropped, empty


def text_key(text: str) -> str:
    """What makes two examples the same text: Unicode NFKC, case folded, runs of whitespace as
    one space, ends stripped (a tweet copied with another line break is still the same tweet)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_splits(users: dict[str, Rows], seed: int, train_ratio: float = 0.8) -> dict[str, str]:
    """Text key -> "train" | "val" | "test", one split per text for every user.

    PEFT-U's ``leakage=False``: the distinct sample ids of all users, sorted, shuffled with
    ``random.seed(seed)``, then split by :func:`_split_label` (which shuffles again with the same
    seed): 80/10/10 with at least 2 held out; no per-label minimum. fedpeft's unit is the text
    (:func:`text_key`), ordered by the smallest sample id that carries it: where ids and texts
    correspond one to one (PEFT-U's tweeteval and studemo) that is PEFT-U's order, and the same
    tweet given two ids can never be on both sides."""
    first_id: dict[str, str] = {}
    for rows in users.values():
        for split_rows in rows.values():
            for sid, text, _ in split_rows:
                key = text_key(text)
                if key not in first_id or str(sid) < first_id[key]:
                    first_id[key] = str(sid)
    units = sorted(first_id, key=lambda k: (first_id[k], k))
    random.Random(seed).shuffle(units)
    return {key: split for split, part in zip(SPLITS, _split_label(units, seed, train_ratio)) for key in part}


def split_by_text(users: dict[str, Rows], seed: int, train_ratio: float = 0.8) -> dict[str, Rows]:
    """Every user's examples (whatever split the file put them in) re-split by
    :func:`text_splits`; within a split a user's examples keep the file's order (train, val,
    test). A user may end with an empty split (PEFT-U keeps such users and lists them)."""
    place = text_splits(users, seed, train_ratio)
    out: dict[str, Rows] = {}
    for uid, rows in users.items():
        new: Rows = {s: [] for s in SPLITS}
        for split in SPLITS:
            for row in rows[split]:
                new[place[text_key(row[1])]].append(row)
        out[uid] = new
    return out
