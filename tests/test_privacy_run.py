"""User-level DP in whole runs (issue 19): epsilon per round and at the end, the calibrated noise
in config.yaml, private keys never clipped nor noised, privacy.max_epsilon, resume, refusals.

The accounting itself is checked against dp-accounting in tests/test_privacy_accounting.py and the
mechanism on numbers in tests/test_privacy_mechanism.py; here the same accountant, fed
independently from what the run wrote (its rounds and cohort sizes), must give what the run
reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedpeft.config import ConfigError
from fedpeft.federation.checkpoint import Checkpoint, resume_config
from fedpeft.federation.messages import TRAIN
from fedpeft.federation.privacy_accounting import automatic_delta
from fedpeft.federation.reporting import summary_table
from fedpeft.federation.store import AdapterStore
from fedpeft.launch.prepare import prepare_adapter
from tests.inprocess_grid import InProcessGrid, run_in_process
from tests.test_resume import DriverKilled, KilledInRound3, assert_same_results, config


def private(cfg, mechanism="central", **keys):
    cfg.privacy.mechanism = mechanism
    for key, value in keys.items():
        setattr(cfg.privacy, key, value)
    return cfg


def rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def dp_accounting_epsilon(noise_multiplier: float, sampled: int, population: int, rounds_: int, delta: float) -> float:
    """dp-accounting directly: a sampled Gaussian without replacement, replace-one neighbours.
    dp-accounting takes replace-one's sensitivity as that of add/remove (its open issue 378); one
    user's replacement moves a clipped sum by up to 2C, so the noise it sees is sigma / 2."""
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
    accountant.compose(event, rounds_)
    return accountant.get_epsilon(delta)


def test_epsilon_per_round_and_at_the_end_equal_dp_accounting(tiny_bert, tmp_path):
    cfg = private(config(tiny_bert, tmp_path, "dp"), noise_multiplier=1.5, clipping_norm=0.5)
    results, run = run_in_process(cfg)
    eps = [r["epsilon"] for r in rounds(run)]
    delta = automatic_delta(6)
    expected = [dp_accounting_epsilon(1.5, 3, 6, r, delta) for r in (1, 2, 3, 4)]  # cohort_fraction 0.5 of 6 users
    assert eps == pytest.approx(expected, rel=0.01)
    assert eps == sorted(eps) and eps[0] > 0
    p = results["privacy"]
    assert p["mechanism"] == "central" and p["rounds_composed"] == 4 and p["delta"] == delta
    assert p["epsilon"] == pytest.approx(expected[-1], rel=0.01) and p["sampling_rate"] == 0.5
    assert "without replacement" in p["sampling_model"]
    assert f"{p['epsilon']:.3f} at delta" in summary_table(results)
    assert results["summary"]["epsilon"] == p["epsilon"]


def test_target_epsilon_calibrates_the_noise_and_config_yaml_records_it(tiny_bert, tmp_path):
    cfg = private(config(tiny_bert, tmp_path, "target"), target_epsilon=4.0)
    results, run = run_in_process(cfg)
    written = yaml.safe_load((run / "config.yaml").read_text())["privacy"]
    sigma = written["noise_multiplier"]
    assert sigma != 1.0 and written["target_epsilon"] == 4.0 and written["delta"] == automatic_delta(6)
    assert results["privacy"]["epsilon"] == pytest.approx(4.0, rel=0.01)
    assert dp_accounting_epsilon(sigma, 3, 6, 4, written["delta"]) == pytest.approx(4.0, rel=0.01)


def test_private_keys_are_never_clipped_nor_noised(tiny_bert, tmp_path):
    """fedsa keeps LoRA B and the head private: after one round, every user's stored private part
    is the same with and without DP (strong noise, a tiny clipping norm); the shared part is not."""
    def one_round(name, dp):
        cfg = config(tiny_bert, tmp_path, name, strategy="fedsa")
        cfg.federation.rounds, cfg.federation.cohort_fraction = 1, 1.0
        if dp:
            private(cfg, noise_multiplier=5.0, clipping_norm=1e-3)
        results, run = run_in_process(cfg)
        store = AdapterStore(run / "adapters")
        return {u: store.latest(u)[1] for u in [f"user{i:04d}" for i in range(6)]}, run

    plain, plain_run = one_round("plain", dp=False)
    noisy, noisy_run = one_round("noisy", dp=True)
    for user, state in plain.items():
        assert state.keys() == noisy[user].keys() and state
        for key in state:
            assert torch.equal(state[key], noisy[user][key]), (user, key)
    from safetensors.torch import load_file

    a, b = load_file(plain_run / "shared_final.safetensors"), load_file(noisy_run / "shared_final.safetensors")
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    assert all(".lora_A." in k for k in a)  # only LoRA A was shared (and noised)


def recording_grid(calls: list) -> type[InProcessGrid]:
    """An in-process grid that keeps every train call's (shared part sent down, reply content)."""
    class Recording(InProcessGrid):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            app = self.client_app

            def watched(message, context):
                reply = app(message, context)
                if message.metadata.message_type == TRAIN:
                    calls.append((message.content.array_records["shared"], reply.content))
                return reply
            self.client_app = watched
    return Recording


def test_under_client_clipping_private_keys_are_never_clipped_noised_nor_sent(tiny_bert, tmp_path):
    """mechanism=client, the one mechanism that clips on the client: fedsa sends LoRA A only; every
    reply holds LoRA A keys only, its update clipped to C (1e-3, so every update is clipped); each
    user's stored private part (LoRA B, head) equals the run without DP bit for bit, so nothing
    private was clipped nor noised. A client that clipped its whole adapter fails here."""
    C = 1e-3

    def one_round(name, dp, calls=None):
        cfg = config(tiny_bert, tmp_path, name, strategy="fedsa")
        cfg.federation.rounds, cfg.federation.cohort_fraction = 1, 1.0
        if dp:
            private(cfg, "client", noise_multiplier=5.0, clipping_norm=C)
        _, run = run_in_process(cfg, grid_class=recording_grid(calls) if calls is not None else InProcessGrid)
        store = AdapterStore(run / "adapters")
        return {u: store.latest(u)[1] for u in [f"user{i:04d}" for i in range(6)]}

    calls: list = []
    plain, clipped = one_round("plain", dp=False), one_round("client", dp=True, calls=calls)
    assert len(calls) == 6
    for down, reply in calls:
        assert set(reply.array_records) == {"shared"}
        sent = reply.array_records["shared"]
        assert sent.keys() and all(".lora_A." in k for k in sent.keys())  # nothing private left the user
        update = np.concatenate([sent[k].numpy().astype(np.float64).ravel() - down[k].numpy().ravel() for k in sent.keys()])
        assert np.linalg.norm(update) == pytest.approx(C, rel=1e-3)  # clipped on the client, to C
    for user, state in plain.items():
        private_keys = [k for k in state if ".lora_A." not in k]
        assert private_keys and state.keys() == clipped[user].keys()
        for key in private_keys:
            assert torch.equal(state[key], clipped[user][key]), (user, key)


def test_max_epsilon_stops_training_and_still_scores_everyone(tiny_bert, tmp_path):
    delta = automatic_delta(6)
    after_2, after_3 = (dp_accounting_epsilon(1.0, 3, 6, r, delta) for r in (2, 3))
    cfg = private(config(tiny_bert, tmp_path, "budget"), max_epsilon=float(after_2 + after_3) / 2)
    results, run = run_in_process(cfg)
    assert [r["round"] for r in rounds(run)] == [1, 2]
    p = results["privacy"]
    assert p["stopped_before_round"] == 3 and p["rounds_composed"] == 2 and p["epsilon"] <= cfg.privacy.max_epsilon
    assert results["summary"]["n_evaluated"] == 6 and results["summary"]["n_failed"] == 0
    assert "training stopped before round 3" in summary_table(results)


def test_a_resumed_private_run_reports_the_uninterrupted_epsilon(tiny_bert, tmp_path):
    run_in_process(private(config(tiny_bert, tmp_path, "whole"), noise_multiplier=1.2))
    with pytest.raises(DriverKilled):
        run_in_process(private(config(tiny_bert, tmp_path, "killed"), noise_multiplier=1.2), grid_class=KilledInRound3)
    assert Checkpoint.load(tmp_path / "killed").round == 2
    results, run = run_in_process(resume_config(tmp_path / "killed", [], [("output.progress", "false")]), resume=True)
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert results["privacy"]["epsilon"] == whole["privacy"]["epsilon"] and results["privacy"]["rounds_composed"] == 4
    assert_same_results(run, tmp_path / "whole")  # the noise of each round is seeded: the same shared part


@pytest.mark.parametrize("strategy, keys, match", [
    ("local_only", {}, r"privacy\.mechanism.*local_only"),
    ("fedavg_ft", {}, r"privacy\.mechanism.*fedavg_ft"),
    # adaptive clipping caps the noise multiplier (below 2 x the clipped count's noise: 0.3 here)
    ("fedavg", {"mechanism": "central_adaptive", "target_epsilon": 1.0}, r"privacy\.target_epsilon.*cannot reach"),
    ("fedavg", {"delta": 0.5}, r"privacy\.delta"),
])
def test_what_cannot_be_private_is_refused_before_the_run(strategy, keys, match, tiny_bert, tmp_path):
    cfg = private(config(tiny_bert, tmp_path, "refused", strategy=strategy), **{"mechanism": "central", **keys})
    with pytest.raises(ConfigError, match=match):
        prepare_adapter(cfg)


def test_without_privacy_results_say_what_was_released(tiny_bert, tmp_path):
    results, _ = run_in_process(config(tiny_bert, tmp_path, "none", strategy="fedavg"))
    assert results["privacy"] == {"mechanism": "none", "epsilon": None}  # unbounded: nothing limits it
    cfg = config(tiny_bert, tmp_path, "local", strategy="local_only")
    cfg.federation.rounds = 1
    assert run_in_process(cfg)[0]["privacy"]["epsilon"] == 0.0
