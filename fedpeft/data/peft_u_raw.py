"""PEFT-U raw readers: one task's raw files -> {user_id: {sample_id: {"text": str, "label": [str, ...]}}}.

Each reader follows PEFT-U's own preparation script (ChrisIsKing/Parameter-Efficient-Personalization,
``peft_u/write_data/prepare_<task>.py``, latest version): the same raw file names, the same columns
(read here by name where PEFT-U reads them by position), annotator ids, text fields, label mappings,
filters and the same rule for a (user, sample) pair annotated more than once. Each docstring names
the script and any deviation. Label sets are those of PEFT-U's ``peft_u/util/config.json``
(:mod:`fedpeft.data.peft_u_tasks` holds them with the instructions; the split is
:func:`fedpeft.data.peft_u.split_users`). The readers of JSON raw files (hatexplain, cockamamie,
goemotion's label mapping) are in :mod:`fedpeft.data.peft_u_json`; measuringhatespeech, read through
``datasets``, is in :mod:`fedpeft.data.peft_u_hub`.

A missing raw file raises :class:`fedpeft.config.ConfigError` naming the file and where PEFT-U gets
it (:data:`SOURCES`); malformed content raises :class:`fedpeft.data.common.DataFormatError` naming
the file, the record and the field.
"""

from __future__ import annotations

import ast
import csv
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError
from fedpeft.data.common import format_error, label_error

# user_id -> sample_id -> {"text": str, "label": [str, ...]}  (PEFT-U's PersonalizedData)
PersonalizedData = dict[str, dict[str, dict[str, Any]]]

PEFT_U_REPO = "github.com/ChrisIsKing/Parameter-Efficient-Personalization"

TWEETEVAL_FILE = "annotations_g3.csv"
TWEETEVAL_LABELS = ("Hateful", "Non-hateful")
STUDEMO_ANNOTATIONS = "annotation_data.csv"
STUDEMO_TEXTS = "text_data.csv"
# PEFT-U takes every column after text_id, annotator_id as a label, valence and arousal included;
# a label counts where its intensity is >= 1 (so a negative valence is no label).
STUDEMO_LABELS = ("joy", "trust", "anticipation", "surprise", "fear", "sadness", "disgust", "anger", "valence", "arousal")
SUBJECTIVE_DISCOURSE_FILE = "with_features_annotated_questions_responses_gold.tsv"
SD_RESPONSE_LABELS = ("answer", "answer_overans-sway", "cant-answer-lying", "cant-answer-sincere", "shift-correct", "shift-dodge")
SD_SENTIMENTS = {  # raw spelling -> prepared spelling (PEFT-U's label_map)
    "veryNegative": "very-negative", "somewhatNegative": "somewhat-negative", "negative": "negative",
    "neutral": "neutral", "positive": "positive", "somewhatPositive": "somewhat-positive",
    "veryPositive": "very-positive",
}
SD_TEXT_COLUMNS = ("q_speaker_detail", "q_text", "r_speaker_detail", "r_text")
SD_TASK_COLUMN = {
    "subjectivediscourse_response": "gold_coarse_labels",
    "subjectivediscourse_question_sentiment": "gold_q_sentiments",
    "subjectivediscourse_response_sentiment": "gold_sentiments",
}
GABHATE_FILE = "GabHateCorpus_annotations.tsv"
GABHATE_LABELS = {0: "Non-hateful", 1: "Hateful"}
UNHEALTHY_FILE = "unhealthy_full.csv"
UNHEALTHY_LABELS = {"1": "healthy", "0": "unhealthy"}
WIKIDETOX_ANNOTATIONS = "aggression_annotations.tsv"
WIKIDETOX_COMMENTS = "aggression_annotated_comments.tsv"
WIKIDETOX_LABELS = {0: "Normal", 1: "Aggressive"}
EPIC_FILE = "EPICorpus.csv"
EPIC_LABELS = {"iro": "Ironic", "not": "Non-ironic"}

# Where PEFT-U gets each dataset's raw files (its scripts read them from data/<task>/).
SOURCES = {
    "tweeteval": f"PEFT-U ships it in its repository, {PEFT_U_REPO}, data/tweeteval/annotations_g3.csv.",
    "studemo": f"PEFT-U ships them in its repository, {PEFT_U_REPO}, data/studemo/ (text_data.csv; "
               "StudEmo_clean.zip, to unpack).",
    "subjectivediscourse": "It comes from Ferracane et al. (2021), github.com/elisaF/subjective_discourse.",
    "hatexplain": "It comes from HateXplain (Mathew et al. 2021), github.com/hate-alert/HateXplain, Data/dataset.json.",
    "measuringhatespeech": "It is the Hugging Face dataset ucberkeley-dlab/measuring-hate-speech "
                           "(huggingface.co/datasets/ucberkeley-dlab/measuring-hate-speech), which PEFT-U loads "
                           "with datasets.load_dataset.",
    "gabhate": "It comes from the Gab Hate Corpus (Kennedy et al.), osf.io/edua3, GabHateCorpus_annotations.tsv.",
    "unhealthyconversations": "It comes from the Unhealthy Comment Corpus (Price et al. 2020), "
                              "github.com/conversationai/unhealthy-conversations, unhealthy_full.csv.",
    "wikidetox": "It comes from Wikipedia Talk Labels: Aggression (Wulczyn et al., Wikipedia Detox) on figshare, "
                 "figshare.com/articles/dataset/Wikipedia_Talk_Labels_Aggression/4267550 (see "
                 "meta.wikimedia.org/wiki/Research:Detox/Data_Release).",
    "goemotion": "It comes from GoEmotions (Demszky et al. 2020): goemotions_1.csv .. goemotions_3.csv from "
                 "storage.googleapis.com/gresearch/goemotions/data/full_dataset/ and ekman_mapping.json from "
                 "github.com/google-research/google-research, goemotions/data/ekman_mapping.json.",
    "cockamamie": "It comes from Cockamamie Gobbledegook (Gultchin et al., ICML 2019), "
                  "github.com/limorigu/Cockamamie-Gobbledegook, data/cockamamie_gobbledegook_us_data.json, "
                  "saved as cockamamie.json (the name PEFT-U's script opens).",
    "epic": "It comes from EPIC (Frenda et al. 2023), huggingface.co/datasets/Multilingual-Perspectivist-NLU/EPIC, "
            "EPICorpus.csv.",
}
FIX = "Use the file as the dataset distributes it."


def family(task: str) -> str:
    """'subjectivediscourse_response' -> 'subjectivediscourse' (the raw files are shared)."""
    return task.split("_")[0]


def raw_file(raw_dir: str | Path | None, name: str, task: str) -> Path:
    """``raw_dir/name``, or a ConfigError naming the file and where PEFT-U gets it."""
    source = SOURCES[family(task)]
    if raw_dir is None:
        raise ConfigError(f"PEFT-U {task}: --raw is required: the folder holding {name}. {source}")
    path = Path(raw_dir) / name
    if not path.is_file():
        raise ConfigError(
            f"PEFT-U {task}: raw file '{path}' does not exist. --raw must be the folder holding "
            f"{task}'s raw files, PEFT-U's data/{family(task)}/ ({name}). {source}"
        )
    return path


def iter_csv(path: Path, delimiter: str, required: tuple[str, ...]) -> tuple[list[str], Iterator[tuple[int, dict[str, str]]]]:
    """Header and an iterator of (line number, row) with checks for missing columns/cells.

    UTF-8, a leading byte-order mark ignored; quoting as Python's csv module (as PEFT-U's load_csv).
    """
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    handle = path.open("r", encoding="utf-8-sig", newline="")
    reader = csv.reader(handle, delimiter=delimiter)

    def decode_error(err: UnicodeDecodeError) -> Exception:
        handle.close()
        return format_error(path, f"after line {reader.line_num}", "<bytes>", f"<not UTF-8: {err.reason}>", "UTF-8 text", FIX)

    try:
        header = next(reader)
    except StopIteration:
        handle.close()
        raise format_error(path, "line 1 (header)", "<header>", "<empty file>", f"a header with columns {', '.join(required)}",
                           FIX) from None
    except UnicodeDecodeError as err:
        raise decode_error(err) from None
    missing = [c for c in required if c not in header]
    if missing:
        handle.close()
        raise format_error(path, "line 1 (header)", missing[0], header, f"a header with the columns {', '.join(required)} "
                           f"(missing: {', '.join(missing)})", FIX)

    def rows() -> Iterator[tuple[int, dict[str, str]]]:
        with handle:
            try:
                for cells in reader:
                    line = reader.line_num
                    if not cells:
                        continue
                    if len(cells) != len(header):
                        raise format_error(path, f"line {line}", "<row>", f"<{len(cells)} cells>",
                                           f"{len(header)} cells, one per header column",
                                           "Check the row for a broken quote or a missing/extra delimiter.")
                    yield line, dict(zip(header, cells))
            except UnicodeDecodeError as err:
                raise decode_error(err) from None

    return header, rows()


def _mapped(path: Path, where: str, column: str, value: str, mapping: dict, parse=str) -> str:
    """``mapping[parse(value)]`` or a DataFormatError listing the allowed raw values."""
    try:
        return mapping[parse(value)]
    except (KeyError, ValueError):
        allowed = ", ".join(f"{k} ({v})" for k, v in mapping.items())
        raise format_error(path, where, column, value, f"one of {allowed}", "Fix the cell.") from None


def read_tweeteval(raw_dir: str | Path | None) -> PersonalizedData:
    """``annotations_g3.csv``: ``id,text`` then one column per annotator (``label_M_1`` ...).

    As PEFT-U (``prepare_tweeteval.py``): each annotator column is a user whose id is the column
    name; every cell is one example ``{text, label: [cell]}``. An empty cell means the annotator
    did not label that tweet and gives no example (PEFT-U would keep it as label '').
    """
    path = raw_file(raw_dir, TWEETEVAL_FILE, "tweeteval")
    header, rows = iter_csv(path, ",", ("id", "text"))
    users = [c for c in header if c not in ("id", "text")]
    if not users:
        raise format_error(path, "line 1 (header)", "<annotator columns>", header,
                           "one column per annotator after id,text (label_M_1, ...)", FIX)
    data: PersonalizedData = {u: {} for u in users}
    for line, row in rows:
        sid = row["id"]
        for user in users:
            value = row[user]
            if value == "":
                continue
            if value not in TWEETEVAL_LABELS:
                raise label_error(path, f"line {line} (id={sid})", user, value, TWEETEVAL_LABELS,
                                  "Fix the cell (leave it empty where the annotator gave no label).")
            data[user][sid] = {"text": row["text"], "label": [value]}
    return data


def _intensity(path: Path, line: int, record: str, column: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise format_error(path, f"line {line} ({record})", column, value, "a number (annotation intensity, e.g. 0.0 or 2.0)",
                           "Fix the cell.") from None


def read_studemo(raw_dir: str | Path | None) -> PersonalizedData:
    """``annotation_data.csv`` (text_id, annotator_id, one intensity column per emotion) and
    ``text_data.csv`` (text_id, text).

    As PEFT-U (``prepare_studemo.py``): every column after text_id, annotator_id is a label
    (the 8 emotions, valence and arousal); a label counts where its intensity is >= 1; a
    (user, text) pair keeps its first annotation; an annotation with no label gives no example.
    """
    ann_path = raw_file(raw_dir, STUDEMO_ANNOTATIONS, "studemo")
    txt_path = raw_file(raw_dir, STUDEMO_TEXTS, "studemo")
    _, text_rows = iter_csv(txt_path, ",", ("text_id", "text"))
    id2text = {row["text_id"]: row["text"] for _, row in text_rows}
    header, rows = iter_csv(ann_path, ",", ("text_id", "annotator_id", *STUDEMO_LABELS))
    label_columns = [c for c in header if c not in ("text_id", "annotator_id")]
    data: PersonalizedData = {}
    for line, row in rows:
        sid, uid = row["text_id"], row["annotator_id"]
        record = f"text_id={sid}, annotator_id={uid}"
        user = data.setdefault(uid, {})
        if sid in user:
            continue
        labels = [c for c in label_columns if _intensity(ann_path, line, record, c, row[c]) >= 1]
        if sid not in id2text:
            raise format_error(ann_path, f"line {line} ({record})", "text_id", sid, f"a text_id listed in {txt_path}",
                               "Use the annotation and text files of the same StudEmo release.")
        if labels:
            user[sid] = {"text": id2text[sid], "label": labels}
    return data


def _tuple_cell(path: Path, line: int, record: str, column: str, value: str) -> list[str]:
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = None
    if not isinstance(parsed, (tuple, list)) or not all(isinstance(v, str) for v in parsed):
        raise format_error(path, f"line {line} ({record})", column, value, "a Python tuple literal of strings, "
                           "one entry per annotator, e.g. ('worker_1', 'worker_7')", "Fix the cell.")
    return list(parsed)


def read_subjectivediscourse(raw_dir: str | Path | None, task: str) -> PersonalizedData:
    """``with_features_annotated_questions_responses_gold.tsv`` (header; first column unnamed).

    As PEFT-U (``prepare_subjectivediscourse.py``): sample id = ``qa_index``; text =
    q_speaker_detail, q_text, r_speaker_detail, r_text joined by ' \\n '; ``gold_workers`` lists
    the annotators and the task's column (``gold_coarse_labels`` / ``gold_q_sentiments`` /
    ``gold_sentiments``) their labels, position by position; sentiments are respelled
    (veryNegative -> very-negative, ...). PEFT-U reads the columns by position (3, 5-8, 11, 17,
    18, 21); here they are read by name.
    """
    path = raw_file(raw_dir, SUBJECTIVE_DISCOURSE_FILE, task)
    label_column = SD_TASK_COLUMN[task]
    _, rows = iter_csv(path, "\t", ("qa_index", *SD_TEXT_COLUMNS, "gold_workers", label_column))
    allowed = SD_RESPONSE_LABELS if task == "subjectivediscourse_response" else tuple(SD_SENTIMENTS)
    data: PersonalizedData = {}
    for line, row in rows:
        sid = row["qa_index"]
        record = f"qa_index={sid}"
        workers = _tuple_cell(path, line, record, "gold_workers", row["gold_workers"])
        labels = _tuple_cell(path, line, record, label_column, row[label_column])
        if len(labels) != len(workers):
            raise format_error(path, f"line {line} ({record})", label_column, row[label_column],
                               f"{len(workers)} entries, one per annotator in gold_workers", "Fix the cell.")
        text = " \n ".join(row[c] for c in SD_TEXT_COLUMNS)
        for worker, label in zip(workers, labels):
            if label not in allowed:
                raise format_error(path, f"line {line} ({record})", label_column, label, f"one of {', '.join(allowed)}",
                                   "Fix the cell.")
            data.setdefault(worker, {})[sid] = {"text": text, "label": [SD_SENTIMENTS.get(label, label)]}
    return data


def read_gabhate(raw_dir: str | Path | None) -> PersonalizedData:
    """``GabHateCorpus_annotations.tsv`` (tab-separated, header ID, Annotator, Text, Hate, HD, CV, ...).

    As PEFT-U (``prepare_gabhate.py``): user = ``Annotator``, sample id = ``ID``, text = ``Text``,
    label = ``Hate`` mapped 0 -> Non-hateful, 1 -> Hateful; a repeated (annotator, ID) keeps the
    last row. PEFT-U reads columns 0-3 by position; here they are read by name.
    """
    path = raw_file(raw_dir, GABHATE_FILE, "gabhate")
    _, rows = iter_csv(path, "\t", ("ID", "Annotator", "Text", "Hate"))
    data: PersonalizedData = {}
    for line, row in rows:
        where = f"line {line} (ID={row['ID']}, Annotator={row['Annotator']})"
        label = _mapped(path, where, "Hate", row["Hate"], GABHATE_LABELS, int)
        data.setdefault(row["Annotator"], {})[row["ID"]] = {"text": row["Text"], "label": [label]}
    return data


def read_unhealthyconversations(raw_dir: str | Path | None) -> PersonalizedData:
    """``unhealthy_full.csv`` (_unit_id, comment, _trust, _worker_id, antagonize, ..., healthy, ...).

    As PEFT-U (``prepare_unhealthyconversations.py``, latest version): user = ``_worker_id``,
    sample id = ``_unit_id``, text = ``comment``, label = ``healthy`` mapped '1' -> healthy,
    '0' -> unhealthy; a repeated (worker, unit) keeps the first row; ``_trust`` is not used. PEFT-U
    reads columns 0, 1, 3 and 9 by position; here they are read by name.
    """
    path = raw_file(raw_dir, UNHEALTHY_FILE, "unhealthyconversations")
    _, rows = iter_csv(path, ",", ("_unit_id", "comment", "_worker_id", "healthy"))
    data: PersonalizedData = {}
    for line, row in rows:
        user = data.setdefault(row["_worker_id"], {})
        if row["_unit_id"] not in user:
            where = f"line {line} (_unit_id={row['_unit_id']}, _worker_id={row['_worker_id']})"
            label = _mapped(path, where, "healthy", row["healthy"], UNHEALTHY_LABELS)
            user[row["_unit_id"]] = {"text": row["comment"], "label": [label]}
    return data


def read_wikidetox(raw_dir: str | Path | None) -> PersonalizedData:
    """``aggression_annotations.tsv`` (rev_id, worker_id, aggression, aggression_score) and
    ``aggression_annotated_comments.tsv`` (rev_id, comment, year, logged_in, ns, sample, split).

    As PEFT-U (``prepare_wikidetox.py``): user = ``worker_id``, sample id = ``rev_id``, text = the
    comment as distributed (NEWLINE_TOKEN / TAB_TOKEN kept, as PEFT-U), label = ``aggression``
    (int(float(...))) mapped 0 -> Normal, 1 -> Aggressive; a repeated (worker, rev_id) keeps the
    first annotation. PEFT-U reads columns by position; here they are read by name.
    """
    ann_path = raw_file(raw_dir, WIKIDETOX_ANNOTATIONS, "wikidetox")
    txt_path = raw_file(raw_dir, WIKIDETOX_COMMENTS, "wikidetox")
    _, text_rows = iter_csv(txt_path, "\t", ("rev_id", "comment"))
    id2text = {row["rev_id"]: row["comment"] for _, row in text_rows}
    _, rows = iter_csv(ann_path, "\t", ("rev_id", "worker_id", "aggression"))
    data: PersonalizedData = {}
    for line, row in rows:
        sid, user = row["rev_id"], data.setdefault(row["worker_id"], {})
        if sid in user:
            continue
        where = f"line {line} (rev_id={sid}, worker_id={row['worker_id']})"
        label = _mapped(ann_path, where, "aggression", row["aggression"], WIKIDETOX_LABELS, lambda v: int(float(v)))
        if sid not in id2text:
            raise format_error(ann_path, where, "rev_id", sid, f"a rev_id listed in {txt_path}",
                               "Use the annotations and comments files of the same release.")
        user[sid] = {"text": id2text[sid], "label": [label]}
    return data


def read_epic(raw_dir: str | Path | None) -> PersonalizedData:
    """``EPICorpus.csv`` (comma-separated, quoted; id_original, text, parent_id_original,
    parent_text, ..., user, label, annotator metadata).

    As PEFT-U (``prepare_epic.py``): user = ``user``, sample id = ``id_original``, text =
    ``message: "<parent_text>"\\n\\nreply: "<text>"``, label = ``label`` mapped iro -> Ironic,
    not -> Non-ironic; a repeated (user, id_original) keeps the last row. Deviation: PEFT-U reads
    the file with pandas, which would turn an empty cell into 'nan' in the text and could write
    numeric ids as numbers; here cells are kept as the strings in the file.
    """
    path = raw_file(raw_dir, EPIC_FILE, "epic")
    _, rows = iter_csv(path, ",", ("id_original", "text", "parent_text", "user", "label"))
    data: PersonalizedData = {}
    for line, row in rows:
        where = f"line {line} (id_original={row['id_original']}, user={row['user']})"
        label = _mapped(path, where, "label", row["label"], EPIC_LABELS)
        text = f'message: "{row["parent_text"]}"\n\nreply: "{row["text"]}"'
        data.setdefault(row["user"], {})[row["id_original"]] = {"text": text, "label": [label]}
    return data
