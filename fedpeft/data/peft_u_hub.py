"""PEFT-U measuringhatespeech: the Hugging Face dataset ``ucberkeley-dlab/measuring-hate-speech``.

PEFT-U (``peft_u/write_data/prepare_measuringhatespeech.py``) loads it with
``datasets.load_dataset('ucberkeley-dlab/measuring-hate-speech')['train']``. Here it is read through
``datasets`` from, in this order (the first that holds it wins):

1. ``--raw DIR`` saved with ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (its ``train``
   split), read with ``datasets.load_from_disk``;
2. ``--raw DIR`` holding the dataset's data files, searched recursively, the first kind found of
   ``*.parquet``, ``*.arrow``, ``*.csv`` (e.g. a snapshot of the Hub repository), read with
   ``datasets.load_dataset(<kind>, data_files=...)``;
3. the Hugging Face cache: ``datasets.load_dataset('ucberkeley-dlab/measuring-hate-speech',
   split='train')``. Without network set ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) before
   starting Python so that it is served from the cache (``HF_HOME`` / ``HF_DATASETS_CACHE``).

When none of them holds it, a :class:`fedpeft.config.ConfigError` says what was looked for where.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

from fedpeft.config import ConfigError
from fedpeft.data.common import format_error
from fedpeft.data.peft_u_raw import SOURCES, PersonalizedData

MHS_NAME = "ucberkeley-dlab/measuring-hate-speech"
MHS_COLUMNS = ("comment_id", "annotator_id", "text", "hatespeech")
MHS_LABELS = ("0", "1", "2")
DATA_FILE_KINDS = (("parquet", ".parquet"), ("arrow", ".arrow"), ("csv", ".csv"))
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # written by DatasetDict / Dataset .save_to_disk


def _train(loaded: Any, where: str) -> Any:
    """A Dataset, or the 'train' split of a DatasetDict (PEFT-U uses dataset['train'])."""
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ConfigError(f"PEFT-U measuringhatespeech: {where} holds the splits {sorted(loaded)}, not 'train' "
                              f"(PEFT-U uses the 'train' split of {MHS_NAME}).")
        return loaded["train"]
    return loaded


def _read(where: str, load, *args, **kwargs) -> Any:
    try:
        return load(*args, **kwargs)
    except Exception as err:  # a corrupt or foreign copy: say which one
        raise ConfigError(f"PEFT-U measuringhatespeech: could not read {where}: {type(err).__name__}: {str(err)[:300]}. "
                          f"{SOURCES['measuringhatespeech']}") from None


def _local_copy(raw_dir: Path) -> tuple[Any | None, str]:
    """(dataset, where) from --raw, or (None, why nothing was found there)."""
    import datasets

    if not raw_dir.is_dir():
        return None, f"--raw '{raw_dir}' is not a folder"
    if any((raw_dir / m).is_file() for m in SAVED_MARKERS):
        where = f"'{raw_dir}' (save_to_disk)"
        return _train(_read(where, datasets.load_from_disk, str(raw_dir)), where), where
    for kind, suffix in DATA_FILE_KINDS:
        files = sorted(str(p) for p in raw_dir.rglob(f"*{suffix}")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(raw_dir).parts))
        if files:
            where = f"{len(files)} {kind} file(s) under '{raw_dir}'"
            return _read(where, datasets.load_dataset, kind, data_files=files, split="train"), where
    return None, (f"--raw '{raw_dir}' holds neither a save_to_disk folder ({' or '.join(SAVED_MARKERS)}) nor "
                  f"{', '.join('*' + s for _, s in DATA_FILE_KINDS)} files")


def load_measuringhatespeech(raw_dir: str | Path | None) -> tuple[Any, str]:
    """(the dataset's train split as a ``datasets.Dataset``, where it came from); see the module docstring."""
    import datasets

    why_not_local = "no --raw given"
    if raw_dir is not None:
        loaded, where = _local_copy(Path(raw_dir))
        if loaded is not None:
            return loaded, where
        why_not_local = where
        warnings.warn(f"PEFT-U measuringhatespeech: {why_not_local}; trying the Hugging Face cache ({MHS_NAME}).",
                      stacklevel=3)
    offline = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if k in os.environ}
    try:
        loaded = datasets.load_dataset(MHS_NAME, split="train")
    except Exception as err:  # datasets raises many kinds (ConnectionError, FileNotFoundError, DatasetNotFoundError ...)
        raise ConfigError(
            f"PEFT-U measuringhatespeech: found no copy of {MHS_NAME}. Looked, in order, for (1) a local copy at --raw: "
            f"{why_not_local}; (2) the Hugging Face cache, datasets.load_dataset('{MHS_NAME}', split='train') "
            f"(offline settings: {offline or 'none; set HF_HUB_OFFLINE=1 to use the cache without network'}): "
            f"{type(err).__name__}: {str(err)[:300]}. {SOURCES['measuringhatespeech']} On a machine with network, run "
            f"`datasets.load_dataset('{MHS_NAME}')['train'].save_to_disk(DIR)`, copy DIR here and pass --raw DIR."
        ) from None
    return _train(loaded, "the Hugging Face cache"), f"the Hugging Face cache ({MHS_NAME})"


def _cell_id(value: Any) -> str:
    """comment_id / annotator_id as PEFT-U's str(): integral floats (from CSV) written as integers."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def read_measuringhatespeech(raw_dir: str | Path | None) -> PersonalizedData:
    """Columns comment_id, annotator_id, text, hatespeech (others unused).

    As PEFT-U (``prepare_measuringhatespeech.py``): one example per row; user =
    ``str(annotator_id)``, sample id = ``str(comment_id)``, text = ``text``, label =
    ``str(int(hatespeech))``: the annotator's own 0/1/2 rating of the comment's hate speech
    (0 no, 1 unclear, 2 yes), not the continuous ``hate_speech_score``; a repeated (annotator,
    comment) keeps the last row. Deviation: PEFT-U truncates any number with int(); here a
    hatespeech value other than 0, 1 or 2 (e.g. 1.5 or missing) is an error.
    """
    dataset, where = load_measuringhatespeech(raw_dir)
    missing = [c for c in MHS_COLUMNS if c not in dataset.column_names]
    if missing:
        raise format_error(where, "columns", missing[0], dataset.column_names,
                           f"the columns {', '.join(MHS_COLUMNS)} (missing: {', '.join(missing)})",
                           f"Use {MHS_NAME} as distributed.")
    columns = dataset.select_columns(list(MHS_COLUMNS)).to_dict()
    data: PersonalizedData = {}
    for i, (cid, aid, text, rating) in enumerate(zip(*(columns[c] for c in MHS_COLUMNS))):
        comment, user = _cell_id(cid), _cell_id(aid)
        record = f"row {i} (comment_id={comment}, annotator_id={user})"
        try:
            value = float(rating)
        except (TypeError, ValueError):
            value = math.nan
        if not value.is_integer() or str(int(value)) not in MHS_LABELS:
            raise format_error(where, record, "hatespeech", rating, "0, 1 or 2", "Fix the value.")
        if not isinstance(text, str):
            raise format_error(where, record, "text", text, "a string", "Fix the value.")
        data.setdefault(user, {})[comment] = {"text": text, "label": [str(int(value))]}
    return data
