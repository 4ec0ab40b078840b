"""Integration: the real entry point, Flower's simulation engine on Ray, a tiny random BERT."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.cli import sim_args
from fedpeft.federation.checkpoint import final_adapter
from fedpeft.sim import main
from tests.conftest import tiny_args
from tests.inprocess_grid import run_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def one_ray_for_the_module():
    """This module's Ray runs share one Ray session and its warm client actors, as a study's
    runs do (fedpeft.launch.ray_start.SharedRay; their results equal separate runs':
    tests/test_shared_ray.py, and the in-process comparison below)."""
    from fedpeft.launch.ray_start import SharedRay

    with SharedRay():
        yield


def _per_user(run: Path) -> list[dict]:
    with (run / "per_user.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tiny_bert, tmp_path_factory):
    """Two local_only runs with the same seeds: one on Ray that logs to W&B offline, and the same
    config without W&B on the in-process grid, its replies scrambled."""

    out = tmp_path_factory.mktemp("runs")
    assert main(tiny_args(tiny_bert, out, "a", "--wandb", "offline", "wandb.tags=ci,tiny")) == 0
    _, inprocess = run_in_process(sim_args(tiny_args(tiny_bert, out, "b"))[0], reply_order_seed=5)
    return out / "a", inprocess


def test_run_folder_has_every_output(runs):
    run, _ = runs
    for name in ("config.yaml", "metrics.jsonl", "per_user.csv", "results.json", "predictions.jsonl"):
        assert (run / name).is_file(), name
    config_text = (run / "config.yaml").read_text()
    assert "fedpeft_version" in config_text and "git_commit" in config_text
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["trained"] == 6 and r["failed"] == 0 for r in rounds)
    results = json.loads((run / "results.json").read_text())
    assert results["summary"]["n_evaluated"] == 6 and results["summary"]["n_failed"] == 0
    rows = _per_user(run)
    assert [r["user_id"] for r in rows] == [f"user{i:04d}" for i in range(6)]
    assert all(r["status"] == "ok" and 0 <= float(r["accuracy"]) <= 1 and r["rounds_trained"] == "2" for r in rows)


def test_wandb_offline_run_files_written(runs):
    run, _ = runs
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb")), "the offline run has no .wandb data file"


def test_same_seeds_give_identical_per_user_results(runs):
    a, b = runs
    assert (a / "per_user.csv").read_text() == (b / "per_user.csv").read_text()


def test_backbone_loaded_once_per_worker_process(runs):
    run, _ = runs
    workers = json.loads((run / "results.json").read_text())["workers"]
    assert len(workers) >= 1
    assert all(loads == 1 for loads in workers.values()), workers
    # 6 users x (2 train + 2 evaluate) calls were served by these few processes
    assert len(workers) <= 2


def test_local_only_equals_training_each_user_alone(runs, tiny_bert):
    """No sharing means independent training: redo each user alone, outside Ray, and compare."""
    from fedpeft.data import get_benchmark
    from fedpeft.federation.checkpoint import load_run_config
    from fedpeft.learning.models import adapter_state, build_model, load_adapter_state
    from fedpeft.learning.schedule import call_seed
    from fedpeft.learning.training import train_user

    run, _ = runs
    config = load_run_config(run)
    torch.set_num_threads(int(config.ray.client_cpus))
    bench = get_benchmark(config)
    loaded = build_model(config, num_labels=len(bench.task().labels))
    for index, user_id in enumerate(bench.user_ids()):
        load_adapter_state(loaded, loaded.init_state)
        for server_round in (1, 2):
            train_user(loaded, bench.load_user(index).train, bench.task(), config, call_seed(config, index, server_round))
        alone = adapter_state(loaded)
        simulated = final_adapter(run, user_id)
        assert simulated.keys() == alone.keys()
        for key in alone:
            torch.testing.assert_close(simulated[key], alone[key], rtol=1e-5, atol=1e-6, msg=f"{user_id} {key}")


def assert_export_predicts_what_the_run_predicted(run: Path, user: str, out: Path) -> None:
    """``python -m fedpeft.export`` of ``user``, read back by peft's own loader: on the user's
    test texts it predicts what the run predicted (predictions.jsonl)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedpeft.data import get_benchmark
    from fedpeft.export import main as export_main
    from fedpeft.federation.checkpoint import load_run_config

    assert export_main(["--run", str(run), "--user", user, "--out", str(out)]) == 0
    task = json.loads((out / "fedpeft_task.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(
        task["base_model_path"], num_labels=len(task["labels"]), ignore_mismatched_sizes=True  # the head comes from the adapter
    )
    model = PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    bench = get_benchmark(load_run_config(run))
    test = bench.load_user(bench.user_ids().index(user)).test
    with torch.no_grad():
        batch = tokenizer([ex.text for ex in test], padding=True, truncation=True, max_length=task["max_length"], return_tensors="pt")
        preds = [task["labels"][i] for i in model(**batch).logits.argmax(-1).tolist()]
    simulated = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    row = next(r for r in simulated if r["user_id"] == user)
    assert row["sample_ids"] == [ex.id for ex in test]
    assert row["predictions"] == preds


def test_exported_adapter_loads_with_peft_and_predicts_the_same(runs, tmp_path):
    run, _ = runs
    assert_export_predicts_what_the_run_predicted(run, "user0002", tmp_path / "user0002")


# shared and private parts; an extra adapter and two phases (local_only runs on Ray in the `runs` fixture)
RAY_STRATEGIES = ("fedsa", "oppu")


@pytest.mark.parametrize("name", sorted(__import__("fedpeft.strategies", fromlist=["STRATEGIES"]).STRATEGIES))
def test_every_strategy_runs_and_writes_its_results(name, tiny_bert, tmp_path):
    """Each strategy's run and what it writes: through the entry point on Ray for
    ``RAY_STRATEGIES``; the others on the in-process grid (the same ClientApp and FederatedRun
    without Ray: what differs between strategies is which keys are shared, not the transport)."""
    extra = ["strategy.fedper_layers=1", "strategy.oppu_task_rounds=1", "strategy.finetune_epochs=1"]
    args = tiny_args(tiny_bert, tmp_path, name, "--strategy", name, *extra)
    if name in RAY_STRATEGIES:
        assert main(args) == 0
    else:
        run_in_process(sim_args(args)[0])
    run = tmp_path / name
    results = json.loads((run / "results.json").read_text())
    assert results["summary"]["n_failed"] == 0 and results["summary"]["n_evaluated"] == 6
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rounds) == results["rounds"] >= 2
    assert all(r["seconds"] > 0 and "bytes_up" in r and "bytes_down" in r for r in rounds)
    shares = results["parameters"]["shared_params"] > 0
    assert (results["communication"]["bytes_total"] > 0) == shares
    assert (run / "shared_final.safetensors").is_file() == shares
    assert results["parameters"]["trainable_params_per_user"] > 0
    if name != "fedavg":  # everything but fedavg keeps something private on the client
        assert results["private_bytes_per_user"]["mean"] > 0


def test_compare_writes_table_per_user_table_and_plots(tiny_bert, tmp_path):
    from fedpeft.study.compare import main as compare_main

    out = tmp_path / "cmp"
    args = ["--strategies", "fedsa", "--compare-out", str(out), *tiny_args(tiny_bert, tmp_path, "unused")]
    args = [a for a in args if a not in ("--name", "unused")]
    assert compare_main(args) == 0
    with (out / "comparison.csv").open() as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"local_only", "fedsa", "majority"}  # the baseline is added; each user's majority label
    assert float(rows["local_only"]["gain_vs_local_only"]) == 0.0
    assert float(rows["fedsa"]["bytes_total"]) > 0 == float(rows["local_only"]["bytes_total"])
    with (out / "per_user.csv").open() as f:
        per_user = list(csv.DictReader(f))
    assert len(per_user) == 6 and set(per_user[0]) == {"user_id", "local_only", "fedsa"}
    for png in ("rounds.png", "distribution.png", "scatter.png"):
        assert (out / png).stat().st_size > 10_000


# T5 with LoRA runs through the entry point in test_lamp_tasks_run_and_are_scored_as_lamp_scores_them (LaMP-4)
@pytest.mark.parametrize("model, method, strategy, on_ray", [("tiny_gpt2", "prefix_tuning", "fedavg", True),
                                                              ("tiny_t5", "few_shot", "local_only", False)])
def test_generative_backbones_run_through_the_entry_point(model, method, strategy, on_ray, request, tmp_path):
    """GPT-2 with prefix tuning on Ray; T5 zero-training few-shot on the in-process grid (T5 with
    LoRA runs on Ray in the LaMP-4 test)."""
    path = request.getfixturevalue(model)
    name = f"{model}-{method}"
    args = tiny_args(path, tmp_path, name, "--strategy", strategy, "--peft", method, "peft.num_virtual_tokens=4",
                     "model.max_new_tokens=4")
    if on_ray:
        assert main(args) == 0
    else:
        run_in_process(sim_args(args)[0])
    results = json.loads((tmp_path / name / "results.json").read_text())
    assert results["summary"]["n_evaluated"] == 6 and results["summary"]["n_failed"] == 0
    assert (results["parameters"]["trainable_params_per_user"] > 0) == (method != "few_shot")
    rows = [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
    assert all(len(r["predictions"]) == 6 for r in rows)


def test_peft_u_multilabel_task_runs_through_the_entry_point(tiny_bert, tmp_path):
    """A prepared PEFT-U file with multi-label users: BCE training and PEFT-U scoring inside Ray."""
    labels = ["joy", "anger", "fear"]
    users = {}
    for u in range(3):
        samples = {f"s{u}{i}": {"text": f"text number {i} from user {u}", "label": [labels[i % 3], labels[(i + u) % 3]]}
                   for i in range(12)}
        ids = list(samples)
        users[f"annotator{u}"] = {"train": {k: samples[k] for k in ids[:8]}, "val": {k: samples[k] for k in ids[8:10]},
                                  "test": {k: samples[k] for k in ids[10:]}}
    users["annotator9"] = {"train": users["annotator0"]["train"], "val": {}, "test": {}}  # unusable: no test split
    data = tmp_path / "prepared"
    data.mkdir()
    (data / "user_data_leaked.json").write_text(json.dumps(users))
    args = tiny_args(tiny_bert, tmp_path, "peftu", "--benchmark", "peft-u/studemo", f"data.path={data}",
                     f"data.cache_dir={tmp_path / 'cache'}", "--strategy", "fedsa", "data.split=leaked")
    assert main(args) == 0
    results = json.loads((tmp_path / "peftu" / "results.json").read_text())
    assert results["num_users"] == 3 and results["summary"]["n_evaluated"] == 3
    assert results["summary"]["n_skipped"] == 1 and "annotator9" in results["skipped_users"]
    assert results["metrics"] == ["accuracy", "macro_f1", "example_f1", "jaccard", "accuracy_any"]  # top label first
    preds = [json.loads(line) for line in (tmp_path / "peftu" / "predictions.jsonl").read_text().splitlines()]
    from fedpeft.data.peft_u import LABELS

    studemo = set(results["data"]["labels"])  # the task's 10 labels (PEFT-U's), not only the 3 the fixture uses
    assert studemo == set(LABELS["studemo"]) and all(set(p.split(", ")) <= studemo for row in preds for p in row["predictions"])


@pytest.mark.parametrize("task, model, metric", [(2, "tiny_bert", "accuracy"), (3, "tiny_bert", "mae"), (4, "tiny_t5", "rouge1")])
def test_lamp_tasks_run_and_are_scored_as_lamp_scores_them(task, model, metric, request, tmp_path):
    """LaMP-4 (T5 with LoRA, generation) through the entry point on Ray; LaMP-2 and LaMP-3 (an
    encoder, as every other Ray test) on the in-process grid, the same ClientApp and scoring."""
    from tests.test_lamp import simple_questions, write_lamp

    questions = simple_questions(task, n_users=3, n_items=6)
    golds = {q["id"]: str(1 + 2 * i) for i, q in enumerate(questions)} if task == 3 else None  # ratings 1, 3, 5
    folder = write_lamp(tmp_path, task, questions, golds)
    args = tiny_args(request.getfixturevalue(model), tmp_path, f"lamp{task}", "--benchmark", f"lamp/LaMP-{task}",
                     f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}", "data.retrieval_k=1",
                     "data.max_length=64", "model.max_new_tokens=4")
    if task == 4:
        assert main(args) == 0
    else:
        run_in_process(sim_args(args)[0])
    results = json.loads((tmp_path / f"lamp{task}" / "results.json").read_text())
    assert results["metrics"][0] == metric and results["summary"]["n_evaluated"] == 3
    assert results["summary"][f"{metric}_mean"] >= 0
    if task == 3:  # LaMP's own RMSE over all questions, not a mean of per-user RMSEs (which is the MAE here)
        predicted = {row["sample_ids"][0]: row["predictions"][0] for row in
                     map(json.loads, (tmp_path / "lamp3" / "predictions.jsonl").read_text().splitlines())}
        errors = []
        for qid, gold in golds.items():
            try:
                value = float(predicted[qid])
            except ValueError:  # LaMP: an unparsable answer is the rating farthest from the gold
                value = 1.0 if abs(1 - float(gold)) > abs(5 - float(gold)) else 5.0
            errors.append(value - float(gold))
        assert results["headline"] == "corpus"
        assert results["summary"]["rmse"] == pytest.approx(float(np.sqrt(np.mean(np.square(errors)))))
        assert results["summary"]["mae"] == pytest.approx(float(np.mean(np.abs(errors))))


def test_same_seeds_give_byte_identical_results_on_ray(tiny_bert, tmp_path):
    """Replies arrive in any order on Ray; aggregation runs in partition order, so a Ray run
    agrees to the byte with the same config run in process with its replies scrambled, and so
    with any other run of it (fedsa: a shared and a private part; fedavg's Ray run is compared
    with a small message window in tests/test_message_window.py)."""
    args = ("--strategy", "fedsa", "federation.cohort_fraction=0.5")
    assert main(tiny_args(tiny_bert, tmp_path, "ray", *args)) == 0
    _, inprocess = run_in_process(sim_args(tiny_args(tiny_bert, tmp_path, "inprocess", *args))[0], reply_order_seed=3)
    for name in ("per_user.csv", "shared_final.safetensors"):
        assert (tmp_path / "ray" / name).read_bytes() == (inprocess / name).read_bytes(), name
