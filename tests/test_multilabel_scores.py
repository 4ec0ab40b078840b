"""Multi-label predictions list the most confident label first, and the majority baseline shows
that predicting more labels does not raise the headline (only PEFT-U's lenient accuracy_any)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec
from fedpeft.learning.scoring import KIND_METRICS
from tests.conftest import load_sim
from tests.test_peft_u import config, prepared, write_prepared

ROOT = Path(__file__).resolve().parents[1]
LABELS = ("anger", "fear", "joy", "sadness", "surprise", "trust")


def _head_bias_key(loaded) -> str:
    return next(k for k in loaded.init_state if "classifier" in k and k.endswith("bias"))


@pytest.fixture(scope="module")
def encoder(tiny_bert):
    from fedpeft.learning.models import build_model

    cfg = Config()
    cfg.model.name = str(tiny_bert)
    return cfg, build_model(cfg, len(LABELS))


def test_encoder_multilabel_prediction_is_ordered_by_decreasing_logit(encoder):
    from fedpeft.learning.models import load_adapter_state
    from fedpeft.learning.training import predict

    cfg, loaded = encoder
    task = TaskSpec("multilabel", LABELS, KIND_METRICS["multilabel"])
    examples = [Example(id=f"e{i}", text=text, labels=("joy",)) for i, text in
                enumerate(["a short review", "another text, quite different", "the third one"])]
    key = _head_bias_key(loaded)
    # a bias whose order is not the label order: several labels above 0, the largest not first
    load_adapter_state(loaded, {key: torch.tensor([0.3, -0.6, 0.9, 0.15, -0.3, 0.6])})
    predicted = predict(loaded, examples, task, cfg)
    tok = loaded.tokenizer
    for example, prediction in zip(examples, predicted):
        with torch.no_grad():
            logits = loaded.model(**tok(example.text, return_tensors="pt")).logits[0].float().tolist()
        expected = sorted((i for i, v in enumerate(logits) if v > 0), key=lambda i: -logits[i])
        assert len(expected) >= 3 and expected != sorted(expected)  # the check can tell the two orders apart
        assert prediction.split(", ") == [LABELS[i] for i in expected], (prediction, logits)
    # no logit above 0: the single most confident label
    load_adapter_state(loaded, {key: torch.tensor([-3.0, -2.0, -4.0, -1.0, -5.0, -2.5])})
    with torch.no_grad():
        logits = loaded.model(**tok(examples[0].text, return_tensors="pt")).logits[0]
    assert predict(loaded, examples[:1], task, cfg) == [LABELS[int(logits.argmax())]]
    load_adapter_state(loaded, {key: loaded.init_state[key]})


# ----------------------------------------------------------------------------- majority baseline

def _baseline():
    return load_sim("majority_baseline")


USERS = prepared({
    # top-1 'joy' (4 of 5 training examples); test: joy gold 1 of 4 -> 0.25
    "1": {"train": [("a", "t a", ["joy"]), ("b", "t b", ["joy"]), ("c", "t c", ["joy", "trust"]),
                    ("d", "t d", ["joy"]), ("e", "t e", ["fear"])], "val": [],
          "test": [("f", "t f", ["joy"]), ("g", "t g", ["fear"]), ("h", "t h", ["trust"]), ("i", "t i", ["anger"])]},
    # top-1 'anger'; test: anger gold 2 of 3 -> 2/3
    "2": {"train": [("a", "t a", ["anger"]), ("b", "t b", ["anger", "fear"]), ("c", "t c", ["fear"]),
                    ("d", "t d", ["anger"])], "val": [],
          "test": [("e", "t e", ["anger"]), ("f", "t f", ["anger", "fear"]), ("g", "t g", ["sadness"])]},
})


def test_majority_baseline_top_k_all_raises_only_accuracy_any(tmp_path, capsys):
    baseline = _baseline()
    path = write_prepared(tmp_path, USERS)
    args = ["--benchmark", "peft-u/studemo", f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}",
            "data.split=leaked"]  # the fixture's own splits
    results = {}
    for k in ("1", "2", "all"):
        out = tmp_path / f"top{k}.json"
        assert baseline.main([*args, "--top-k", k, "--json-out", str(out)]) == 0
        results[k] = json.loads(out.read_text())
        printed = capsys.readouterr().out
        assert all(m in printed for m in KIND_METRICS["multilabel"]), printed
    top1, every = results["1"], results["all"]
    assert top1["metrics"] == list(KIND_METRICS["multilabel"]) and top1["metric"] == "accuracy"
    mean = {k: {m: r["summary"][m]["mean"] for m in r["metrics"]} for k, r in results.items()}
    assert mean["1"]["accuracy"] == pytest.approx((1 / 4 + 2 / 3) / 2)
    assert mean["all"]["accuracy_any"] == 1.0 and mean["1"]["accuracy_any"] < 1.0
    for k in ("2", "all"):
        assert mean[k]["accuracy"] <= mean["1"]["accuracy"] + 1e-12, k
        assert mean[k]["macro_f1"] <= mean["1"]["macro_f1"] + 1e-12, k
    assert mean["all"]["example_f1"] < mean["1"]["example_f1"] and mean["all"]["jaccard"] < mean["1"]["jaccard"]
    # user 1, top-2 = joy, then trust and fear tie at 1 (the first seen, 'trust', wins)
    assert every["per_user"]["1"]["accuracy_any"] == 1.0 and results["2"]["per_user"]["1"]["accuracy_any"] == 0.5


def test_majority_baseline_rejects_a_bad_top_k(tmp_path, capsys):
    baseline = _baseline()
    with pytest.raises(SystemExit):
        baseline.main(["--benchmark", "peft-u/studemo", f"data.path={tmp_path}", "--top-k", "0"])
    assert "--top-k must be a positive whole number or 'all', got '0'" in capsys.readouterr().err


def test_peft_u_multilabel_task_lists_the_multilabel_metrics(tmp_path):
    from fedpeft.data.peft_u import PeftUBenchmark

    task = PeftUBenchmark(config(write_prepared(tmp_path, USERS), tmp_path, task="studemo")).task()
    assert task.kind == "multilabel" and task.metrics == KIND_METRICS["multilabel"]
