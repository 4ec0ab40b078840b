"""sims/throughput.py's reference loops do exactly fedpeft's workload: the same batches, the same
tokens, the same number of examples, (same init, same steps) the same losses, and in the final
evaluation the same predicted examples (test and validation splits, as fedpeft scores both)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from sims import throughput_frameworks, throughput_workload
from tests.conftest import load_sim

ROOT = Path(__file__).resolve().parents[1]


def _throughput():
    return load_sim("throughput")


@pytest.fixture(scope="module")
def setup(tiny_bert):
    tp = _throughput()
    # 6 examples, batches of 4, 3 steps: a short batch at the epoch's end, then a reshuffle
    # 5 validation and 3 test examples, evaluated 4 rows at a time: a short batch in each split
    overrides = [f"model.name={tiny_bert}", "data.num_users=2", "data.train_per_user=6", "data.val_per_user=5",
                 "data.test_per_user=3", "federation.rounds=1", "train.steps=3", "train.batch_size=4",
                 "train.eval_batch_size=4"]
    return tp, tp.build_workload(overrides)


def fedpeft_predicted(work, tmp_path) -> tuple[int, Path]:
    """(rows fedpeft's ClientApp predicted in its evaluate calls, the run folder): the workload
    run in process as sims/throughput.py runs it (the last round evaluated only), every batch
    of every evaluate call counted as fedpeft's predict announces it."""
    from fedpeft.federation.messages import EVALUATE
    from fedpeft.learning.training import batch_listener
    from tests.inprocess_grid import InProcessGrid, run_in_process

    predicted = []

    class CountingGrid(InProcessGrid):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            app = self.client_app

            def counted(message, context):
                if message.metadata.message_type != EVALUATE:
                    return app(message, context)
                with batch_listener(lambda examples, rows: predicted.append(len(rows))):
                    return app(message, context)

            self.client_app = counted

    config = copy.deepcopy(work.config)  # the workload's config, written to this test's folder
    config.output.dir, config.output.name, config.output.progress = str(tmp_path), "fedpeft", False
    config.federation.strategy, config.federation.eval_every = "local_only", 1000000
    _, run = run_in_process(config, grid_class=CountingGrid)
    return sum(predicted), run


def test_reference_batches_and_examples_are_fedpeft_s(setup):
    from fedpeft.data import get_benchmark
    from fedpeft.learning import models
    from fedpeft.learning.inputs import CallTokens
    from fedpeft.learning.schedule import call_seed
    from fedpeft.learning.training import batch_listener, train_user

    tp, work = setup
    config = work.config
    bench = get_benchmark(config)
    loaded = models.build_model(config, len(bench.task().labels))
    fedpeft_examples, fedpeft_losses = 0, []
    for u in range(len(work.users)):
        seen: list[list[int]] = []
        models.compose_user_model(loaded, {}, None)  # local_only: every user starts from the common init
        user = bench.load_user(u)
        with batch_listener(lambda examples, rows, seen=seen: seen.append(list(rows))):
            result = train_user(loaded, user.train, bench.task(), config, call_seed(config, u, 1))
        assert seen == work.steps(u, 1)  # the same rows in the same order
        assert [len(rows) for rows in seen] == [4, 2, 4]
        tokens = CallTokens(loaded, config)
        for rows in seen:  # the same model inputs, padded the same way
            ours, _ = throughput_workload.batch(work.users[u].train, rows)
            theirs = tokens.batch([user.train[i] for i in rows])
            assert set(ours) == set(theirs)
            for key in ours:
                assert torch.equal(ours[key], theirs[key]), key
        fedpeft_examples += int(result["examples"])
        fedpeft_losses.append(result["train_loss"])
    assert fedpeft_examples == work.training_examples() == 20

    plain = throughput_frameworks.run_plain(work)
    flowertune = throughput_frameworks.run_flowertune(work)
    assert plain["examples"] == flowertune["examples"] == fedpeft_examples
    assert flowertune["model_builds"] == 1 + 2 + 2  # the initial one, one per training call, one per evaluation
    # same init, same batches, same optimizer: the same losses as fedpeft's train_user
    mean_fedpeft = sum(fedpeft_losses) / len(fedpeft_losses)
    assert plain["train_loss_last_round"] == pytest.approx(mean_fedpeft, abs=1e-5)
    assert flowertune["train_loss_last_round"] == pytest.approx(mean_fedpeft, abs=1e-5)


def test_every_variant_predicts_the_same_examples_in_evaluation(setup, tmp_path):
    """Before: fedpeft predicted each user's test and validation splits, the reference loops the
    test split only (3 of 8 rows per user), so fedpeft did 2.7x their evaluation work."""
    tp, work = setup
    expected = work.eval_examples()
    assert expected == 2 * (5 + 3)
    fedpeft, run = fedpeft_predicted(work, tmp_path)
    assert fedpeft == expected
    assert tp.fedpeft_eval_examples(run, work.config.federation.rounds) == expected  # what the script reports for it
    counts = {"plain-local_only": throughput_frameworks.run_plain(work)["eval_examples"], "plain-fedavg": throughput_frameworks.run_plain(work, "fedavg")["eval_examples"],
              "flowertune-local_only": throughput_frameworks.run_flowertune(work)["eval_examples"]}
    if not tp.pfl_available():
        counts["pfl-fedavg"] = throughput_frameworks.run_pfl(work)["eval_examples"]
    assert counts == dict.fromkeys(counts, expected)


def test_pfl_trains_the_same_examples(setup):
    pytest.importorskip("pfl")
    tp, work = setup
    pfl = throughput_frameworks.run_pfl(work)
    plain = throughput_frameworks.run_plain(work, "fedavg")
    assert pfl["examples"] == plain["examples"] == work.training_examples()
    assert pfl["accuracy"] == pytest.approx(plain["accuracy"])  # FedAvg of the same updates
