"""PEFT-U's 13 tasks: label sets, instructions, raw files and readers, in one registry.

Labels, multi-label flags and instructions are PEFT-U's (``peft_u/util/config.json``, latest version;
its labels are those the preparation scripts write, e.g. 'very-negative' for SubjectiveDiscourse).
:func:`read_raw` dispatches to the task's reader (:mod:`fedpeft.data.peft_u_raw`,
:mod:`fedpeft.data.peft_u_json`, :mod:`fedpeft.data.peft_u_hub`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedpeft.config import ConfigError
from fedpeft.data import peft_u_hub as hub
from fedpeft.data import peft_u_json as pj
from fedpeft.data import peft_u_raw as pr
from fedpeft.data.peft_u_raw import SD_TASK_COLUMN, SOURCES, PersonalizedData, family


@dataclass(frozen=True)
class PeftUTask:
    name: str
    labels: tuple[str, ...]
    multi_label: bool
    instruction: str
    raw_files: tuple[str, ...]   # under --raw (measuringhatespeech: a datasets copy, see peft_u_hub)
    script: str                  # PEFT-U's preparation script the reader follows
    read: Callable[[str | Path | None], PersonalizedData]

    @property
    def source(self) -> str:
        return SOURCES[family(self.name)]


_HATE = ("Please review the following text and indicate if it has the presence of hate speech. Respond 'Hateful' if "
         "the text contains hate speech and 'Non-hateful' if the text does not contain hate speech.")
_SENTIMENTS = ("negative", "neutral", "positive", "somewhat-negative", "somewhat-positive", "very-negative", "very-positive")


def _sentiment(towards: str) -> str:
    return (f"Please analyze the following text and rate your sentiment towards the {towards}. Sentiment labels include "
            "'somewhat-positive', 'positive', 'very-positive', 'somewhat-negative', 'very-negative', 'neutral' and "
            f"'negative'. Respond with the sentiment label that best captures your sentiment towards the {towards}.")


def _task(name: str, labels: tuple[str, ...], instruction: str, raw_files: tuple[str, ...], read, multi: bool = False,
          script: str = "") -> PeftUTask:
    return PeftUTask(name, labels, multi, instruction, raw_files,
                     f"peft_u/write_data/{script or f'prepare_{name}.py'}", read)


_SD = ("subjectivediscourse_response", "subjectivediscourse_question_sentiment", "subjectivediscourse_response_sentiment")

# In the order of PEFT-U's config.json.
TASKS: dict[str, PeftUTask] = {t.name: t for t in (
    _task("hatexplain", ("hatespeech", "normal", "offensive"),
          "Please review the following text and indicate if it has the presence of hate speech or is offensive in "
          "nature. Respond 'hatespeech' if the text contains hate speech, 'offensive' if the text does not contain hate "
          "speech but is offensive and 'normal' if the text is neither offensive nor contains hate speech.",
          (pj.HATEXPLAIN_FILE,), pj.read_hatexplain),
    _task("gabhate", ("Hateful", "Non-hateful"), _HATE, (pr.GABHATE_FILE,), pr.read_gabhate),
    _task("measuringhatespeech", hub.MHS_LABELS,
          "On a scale of 0-2 rate the level of hatespeech contained in the following text. Respond with '0' if the text "
          "does not contain hate speech, '1' if the text contains some hate speech, and '2' if the text contains a lot "
          "of hate speech.",
          (f"{hub.MHS_NAME} (save_to_disk folder, data files, or the HF cache)",), hub.read_measuringhatespeech),
    _task("tweeteval", pr.TWEETEVAL_LABELS, _HATE, (pr.TWEETEVAL_FILE,), pr.read_tweeteval),
    _task("unhealthyconversations", ("healthy", "unhealthy"),
          "Please review the following text and indicated if it is 'healthy' or 'unhealthy'. Respond 'healthy' if the "
          "text is healthy and 'unhealthy' if the text can be considered hostile, antagonistic, condescending, "
          "dismissive or an unfair generalization.",
          (pr.UNHEALTHY_FILE,), pr.read_unhealthyconversations),
    _task("wikidetox", ("Aggressive", "Normal"),
          "Please review the following text and indicate if it has the presence of malicious remark to a person or "
          "group. Respond 'Aggressive' if the text contains a personal attack and 'Normal' if the text does not contain "
          "a personal attack.",
          (pr.WIKIDETOX_ANNOTATIONS, pr.WIKIDETOX_COMMENTS), pr.read_wikidetox),
    _task("goemotion", pj.GOEMOTION_LABELS,
          "Please analyze the following text and assign one or more appropriate emotion labels. Emotion labels include "
          "happiness, sadness, anger, surprise, joy, fear, disgust. You can select one or multiple emotion labels that "
          "best capture the emotional content of the text. Respond with the emotion labels separated by a comma.",
          (*pj.GOEMOTION_FILES, pj.GOEMOTION_MAPPING), pj.read_goemotion, multi=True),
    _task("studemo", tuple(sorted(pr.STUDEMO_LABELS)),
          "Please analyze the following text and assign one or more appropriate emotion labels. Emotion labels include "
          "joy, trust, anticipation, surprise, fear, sadness, disgust, anger, valence, and arousal. You can select one "
          "or multiple emotion labels that best capture the emotional content of the text. Respond with the emotion "
          "labels separated by a comma.",
          (pr.STUDEMO_ANNOTATIONS, pr.STUDEMO_TEXTS), pr.read_studemo, multi=True),
    _task("cockamamie", ("no", "yes"),
          "Please rate whether the following text is funny or not funny. Respond 'yes' if you think the text is funny "
          "and 'no' if you think the text is not funny.",
          (pj.COCKAMAMIE_FILE,), pj.read_cockamamie),
    _task("epic", ("Ironic", "Non-ironic"),
          "Irony is a figurative language device that conveys that opposite of literal meaning, profiling "
          "intentionally a secondary or extended meaning. Please review the following message and reply and indicate "
          "if it has the presence of irony. Respond 'Ironic' if the reply if you think the reply is ironic and "
          "'Non-ironic' if you think the reply is not ironic.",
          (pr.EPIC_FILE,), pr.read_epic),
    _task(_SD[0], pr.SD_RESPONSE_LABELS,
          "Please analyze the following text and indicate how the witness responded to the question. Respond with "
          "'answer' if they answered the question reasonably, 'cant-answer-lying' if they could not answer and are "
          "lying, 'cant-answer-sincere' if they could not answer but are honest about it, 'shift-dodge' if they shifted "
          "the topic with the intent of dodging the question, 'answer_overans-sway' if they over answered the question "
          "with the intention of swaying or 'shift-correct' if they shifted the topic with the intention of clarifying "
          "the question.",
          (pr.SUBJECTIVE_DISCOURSE_FILE,), functools.partial(pr.read_subjectivediscourse, task=_SD[0]),
          script="prepare_subjectivediscourse.py"),
    _task(_SD[1], _SENTIMENTS, _sentiment("questioners"), (pr.SUBJECTIVE_DISCOURSE_FILE,),
          functools.partial(pr.read_subjectivediscourse, task=_SD[1]), script="prepare_subjectivediscourse.py"),
    _task(_SD[2], _SENTIMENTS, _sentiment("witness"), (pr.SUBJECTIVE_DISCOURSE_FILE,),
          functools.partial(pr.read_subjectivediscourse, task=_SD[2]), script="prepare_subjectivediscourse.py"),
)}
assert set(_SD) == set(SD_TASK_COLUMN) and len(TASKS) == 13

PREPARE_TASKS = tuple(TASKS)
INSTRUCTIONS = {name: t.instruction for name, t in TASKS.items()}   # for seq2seq prompts, one per task
LABELS = {name: t.labels for name, t in TASKS.items()}


def describe_tasks() -> str:
    """One line per task: name, kind and labels (for error messages and --help)."""
    return "; ".join(f"{n} ({'multi-label' if t.multi_label else 'one label'}: {', '.join(t.labels)})"
                     for n, t in TASKS.items())


def read_raw(task: str, raw_dir: str | Path | None) -> PersonalizedData:
    """user -> sample -> {text, label} for one of :data:`PREPARE_TASKS`, from its raw files under ``raw_dir``."""
    if task not in TASKS:
        raise ConfigError(f"No PEFT-U converter for task '{task}'. PEFT-U's tasks: {', '.join(PREPARE_TASKS)}.")
    return TASKS[task].read(raw_dir)
