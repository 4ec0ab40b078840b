"""PEFT-U raw readers for the tasks whose raw files are JSON: hatexplain, cockamamie, and goemotion
(CSV files plus its JSON label mapping). Same conventions as :mod:`fedpeft.data.peft_u_raw`.
"""

from __future__ import annotations

from pathlib import Path

from fedpeft.data.common import format_error, read_json
from fedpeft.data.peft_u_raw import FIX, PersonalizedData, iter_csv, raw_file

HATEXPLAIN_FILE = "dataset.json"
HATEXPLAIN_LABELS = ("hatespeech", "normal", "offensive")
GOEMOTION_FILES = ("goemotions_1.csv", "goemotions_2.csv", "goemotions_3.csv")
GOEMOTION_MAPPING = "ekman_mapping.json"
GOEMOTION_LABELS = ("anger", "disgust", "fear", "joy", "sadness", "surprise")
COCKAMAMIE_FILE = "cockamamie.json"


def read_hatexplain(raw_dir: str | Path | None) -> PersonalizedData:
    """``dataset.json``: {post_id: {"post_id", "annotators": [{"label", "annotator_id", "target"}],
    "rationales", "post_tokens"}}.

    As PEFT-U (``prepare_hatexplain.py``, ``prepare_data``): posts in sorted key order; every
    annotation is one example of its annotator (user id = ``annotator_id``, sample id =
    ``post_id``, text = ``post_tokens`` joined by single spaces, label = that annotator's own label:
    hatespeech / normal / offensive), whatever the post's majority label ('undecided' posts
    included); a repeated (annotator, post) keeps the last. Deviations: PEFT-U also stores the
    rationales, target groups and majority label of each example and reads
    ``post_id_divisions.json``; neither changes the per-user text and labels, so only text and
    label are kept and ``post_id_divisions.json`` is not required.
    """
    path = raw_file(raw_dir, HATEXPLAIN_FILE, "hatexplain")
    raw = read_json(path)
    fix = "Use HateXplain's Data/dataset.json."
    if not isinstance(raw, dict):
        raise format_error(path, "top level", "<root>", type(raw).__name__, "an object {post_id: post}", fix)
    data: PersonalizedData = {}
    for key in sorted(raw):
        post, record = raw[key], f"post '{key}'"
        if not isinstance(post, dict):
            raise format_error(path, record, "<post>", type(post).__name__, "an object with post_id, post_tokens, annotators", fix)
        for field, kind, what in (("post_id", (str, int), "a string"), ("post_tokens", list, "a list of strings"),
                                  ("annotators", list, "a list of {label, annotator_id, target}")):
            if not isinstance(post.get(field), kind):
                got = post[field] if field in post else f"<missing; keys: {sorted(post)}>"
                raise format_error(path, record, field, got, what, fix)
        if not all(isinstance(t, str) for t in post["post_tokens"]):
            raise format_error(path, record, "post_tokens", post["post_tokens"], "a list of strings", fix)
        text = " ".join(post["post_tokens"])
        for i, ann in enumerate(post["annotators"]):
            where = f"{record}, annotators[{i}]"
            if not isinstance(ann, dict) or "annotator_id" not in ann or "label" not in ann:
                raise format_error(path, where, "annotator_id/label", ann, "an object with 'label' and 'annotator_id'", fix)
            if ann["label"] not in HATEXPLAIN_LABELS:
                raise format_error(path, where, "label", ann["label"], f"one of {', '.join(HATEXPLAIN_LABELS)}", fix)
            data.setdefault(str(ann["annotator_id"]), {})[str(post["post_id"])] = {"text": text, "label": [ann["label"]]}
    return data


def read_goemotion(raw_dir: str | Path | None) -> PersonalizedData:
    """``goemotions_1.csv``, ``_2``, ``_3`` (text, id, author, subreddit, link_id, parent_id,
    created_utc, rater_id, example_very_unclear, then one 0/1 column per emotion, neutral last)
    and ``ekman_mapping.json`` ({ekman emotion: [GoEmotions emotions]}).

    As PEFT-U (``prepare_goemotion.py``): files in that order; user = ``rater_id``, sample id =
    ``id``, text = ``text``; the emotions marked 1 are mapped to Ekman's six (anger, disgust,
    fear, joy, sadness, surprise) through ekman_mapping.json, neutral kept as neutral, duplicates
    merged; a row with neutral among them, or with no emotion, is skipped; a (rater, id) pair keeps
    its first kept row. Deviation: PEFT-U keeps a multi-label example's labels in set order
    (varies from run to run); they are sorted here.
    """
    mapping_path = raw_file(raw_dir, GOEMOTION_MAPPING, "goemotion")
    paths = [raw_file(raw_dir, name, "goemotion") for name in GOEMOTION_FILES]
    mapping = read_json(mapping_path)
    if not isinstance(mapping, dict) or not all(e in GOEMOTION_LABELS and isinstance(v, list) for e, v in mapping.items()):
        raise format_error(mapping_path, "top level", "<root>", mapping, "an object {ekman emotion: [emotions]} with "
                           f"keys among {', '.join(GOEMOTION_LABELS)}", "Use GoEmotions' data/ekman_mapping.json.")
    detailed = {d: e for e, ds in mapping.items() for d in ds} | {"neutral": "neutral"}
    data: PersonalizedData = {}
    for path in paths:
        header, rows = iter_csv(path, ",", ("text", "id", "rater_id", "example_very_unclear"))
        emotions = header[header.index("example_very_unclear") + 1:]
        unknown = [e for e in emotions if e not in detailed]
        if unknown or not emotions:
            raise format_error(path, "line 1 (header)", unknown[0] if unknown else "<emotion columns>", header,
                               f"emotion columns after example_very_unclear, each listed in {mapping_path} (or neutral)", FIX)
        for line, row in rows:
            where = f"line {line} (id={row['id']}, rater_id={row['rater_id']})"
            bad = next((e for e in emotions if row[e] not in ("0", "1")), None)
            if bad:
                raise format_error(path, where, bad, row[bad], "0 or 1", "Fix the cell.")
            labels = sorted({detailed[e] for e in emotions if row[e] == "1"})
            if "neutral" in labels or not labels:
                continue
            user = data.setdefault(row["rater_id"], {})
            if row["id"] not in user:
                user[row["id"]] = {"text": row["text"], "label": labels}
    return data


def read_cockamamie(raw_dir: str | Path | None) -> PersonalizedData:
    """``cockamamie.json``: {"word_ratings": {"votes": [{word: {"no_votes": [voter, ...],
    "yes_votes": [voter, ...]}}, ...]}}.

    As PEFT-U (``prepare_cockamamie.py``): text = the word; sample id = the word's number in order
    of first vote (0, 1, ...; a word without votes gets none); for each word its no voters then
    its yes voters each get the example, so a voter in both lists ends up with 'yes', and a word
    listed again later overwrites the earlier votes of the same voter.
    """
    path = raw_file(raw_dir, COCKAMAMIE_FILE, "cockamamie")
    raw = read_json(path)
    fix = "Use the Cockamamie Gobbledegook ratings JSON."
    votes = raw.get("word_ratings", {}).get("votes") if isinstance(raw, dict) and isinstance(raw.get("word_ratings"), dict) else None
    if not isinstance(votes, list):
        raise format_error(path, "top level", "word_ratings.votes", "<missing or not a list>",
                           "an object {\"word_ratings\": {\"votes\": [...]}}", fix)
    data: PersonalizedData = {}
    ids: dict[str, str] = {}
    for i, item in enumerate(votes):
        if not isinstance(item, dict):
            raise format_error(path, f"word_ratings.votes[{i}]", "<item>", type(item).__name__, "an object {word: votes}", fix)
        for word, value in item.items():
            where = f"word_ratings.votes[{i}], word '{word}'"
            for field in ("no_votes", "yes_votes"):
                if not isinstance(value, dict) or not isinstance(value.get(field), list):
                    raise format_error(path, where, field, "<missing or not a list>", "a list of voter ids", fix)
            for field, label in (("no_votes", "no"), ("yes_votes", "yes")):
                for voter in value[field]:
                    sid = ids.setdefault(word, str(len(ids)))
                    data.setdefault(str(voter), {})[sid] = {"text": word, "label": [label]}
    return data
