"""The privacy accounting, checked against dp-accounting directly (no code shared with fedpeft.federation.privacy).

fedpeft's cohort sampler draws a fixed number m of the n training users without replacement each
round, so each round is a Gaussian release on a sample without replacement, with replace-one
neighbours (Wang, Balle, Kasiviswanathan 2019). Under replace-one a sum of updates clipped to C
moves by up to 2C, so the noise std sigma * C is sigma / 2 times the sensitivity, which is the
multiplier dp-accounting's RDP accountant takes for these events.
"""

from __future__ import annotations

import json

import pytest
from dp_accounting import dp_event, pld, privacy_accountant, rdp

from fedpeft.config import Config, ConfigError
from fedpeft.federation.privacy_accounting import (
    PrivacyAccountant,
    Release,
    automatic_delta,
    calibrate_noise,
    resolve_delta,
)
from fedpeft.strategies.base import Strategy

REPLACE_ONE = privacy_accountant.NeighboringRelation.REPLACE_ONE

# (noise multiplier, training users n, users sampled per round m, rounds, delta)
SETTINGS = [
    (1.0, 100, 10, 8, 1e-3),  # amplification by sampling, q = 0.1
    (2.0, 50, 50, 5, 1e-4),  # everyone every round: no amplification
    (0.7, 1000, 30, 20, 1e-5),  # q = 0.03, more rounds
]


def direct_epsilon(sigma: float, n: int, m: int, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    once = dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(sigma / 2))
    accountant.compose(dp_event.SelfComposedDpEvent(once, rounds))
    return accountant.get_epsilon(delta)


def fedpeft_epsilon(sigma: float, n: int, m: int, rounds: int, delta: float) -> float:
    accountant = PrivacyAccountant(n, delta)
    accountant.compose_round(sigma, m, count=rounds)  # one dp-accounting evaluation (about 0.5 s when m < n)
    return accountant.epsilon()


@pytest.mark.parametrize("sigma, n, m, rounds, delta", SETTINGS)
def test_epsilon_equals_dp_accounting_rdp_within_one_percent(sigma, n, m, rounds, delta):
    ours, theirs = fedpeft_epsilon(sigma, n, m, rounds, delta), direct_epsilon(sigma, n, m, rounds, delta)
    assert 0 < ours < float("inf")
    assert ours == pytest.approx(theirs, rel=0.01)


def test_full_participation_epsilon_is_an_upper_bound_of_the_tight_pld_one():
    """PLD treats replace-one Gaussian events exactly (sensitivity 2C); RDP may only be looser."""
    sigma, rounds, delta = 2.0, 5, 1e-4
    tight = pld.PLDAccountant(neighboring_relation=REPLACE_ONE)
    tight.compose(dp_event.GaussianDpEvent(sigma), rounds)
    ours = fedpeft_epsilon(sigma, 50, 50, rounds, delta)
    assert tight.get_epsilon(delta) <= ours <= 1.25 * tight.get_epsilon(delta)


def test_epsilon_falls_with_noise_and_rises_with_rounds():
    n, m, delta = 50, 50, 1e-4  # full participation: fast to compute
    by_noise = [fedpeft_epsilon(s, n, m, 4, delta) for s in (0.8, 1.5, 3.0)]
    assert by_noise[0] > by_noise[1] > by_noise[2]
    by_rounds = [fedpeft_epsilon(1.5, n, m, r, delta) for r in (1, 4, 16)]
    assert by_rounds[0] < by_rounds[1] < by_rounds[2]
    assert fedpeft_epsilon(1.0, 100, 10, 2, 1e-3) < fedpeft_epsilon(1.0, 100, 100, 2, 1e-3)  # sampling amplifies


def test_per_round_composition_equals_composing_the_rounds_at_once():
    one_by_one = PrivacyAccountant(100, 1e-3)
    for _ in range(3):
        one_by_one.compose_round(1.0, 10)
    assert one_by_one.ledger == [{"noise_multiplier": 1.0, "sample_size": 10, "rounds": 3}]
    assert one_by_one.epsilon() == pytest.approx(direct_epsilon(1.0, 100, 10, 3, 1e-3), rel=0.01)


def test_state_round_trip_gives_the_uninterrupted_epsilon():
    rounds = [(1.2, 50, 50), (1.2, 50, 45), (1.2, 50, 50), (1.2, 50, 50), (1.2, 50, 50)]  # round 2: 5 users failed
    straight = PrivacyAccountant(50, 1e-4)
    for sigma, m, ok in rounds:
        straight.compose_round(sigma, m, replied=ok)
    first = PrivacyAccountant(50, 1e-4)
    for sigma, m, ok in rounds[:3]:
        first.compose_round(sigma, m, replied=ok)
    saved = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    resumed = PrivacyAccountant.from_state(saved)
    assert resumed.epsilon() == pytest.approx(first.epsilon(), rel=1e-12)
    for sigma, m, ok in rounds[3:]:
        resumed.compose_round(sigma, m, replied=ok)
    assert resumed.rounds == straight.rounds == 5
    assert resumed.epsilon() == pytest.approx(straight.epsilon(), rel=1e-12)
    assert resumed.epsilon() == pytest.approx(direct_epsilon(1.2, 50, 50, 5, 1e-4), rel=1e-12)  # the failed round: no extra cost
    assert resumed.report(Config().privacy)["rounds_with_failures"] == 1  # still reported, and kept by the checkpoint


def test_a_round_with_failures_costs_exactly_a_full_round_and_max_epsilon_holds():
    """The issue's case, in the accountant: 50 users, 10 failing every round, a cap. The server stops
    before a round that would pass the cap (would_exceed); the spent epsilon never passes it and
    is the failure-free epsilon, computed with dp-accounting directly (before the fixed
    denominator, 10 of 50 failing made a round cost sigma * 40/50: a cap of 6.31 spent 7.33)."""
    sigma, n, delta = 2.0, 50, 1e-5
    cap = (direct_epsilon(sigma, n, n, 3, delta) + direct_epsilon(sigma, n, n, 4, delta)) / 2  # between rounds 3 and 4
    accountant = PrivacyAccountant(n, delta)
    while not accountant.would_exceed(cap, sigma, n):
        accountant.compose_release(Release(accountant.rounds + 1, "central", sigma, 1.0, sampled=n, replied=40))
        assert accountant.epsilon() <= cap
    assert accountant.rounds == 3
    assert accountant.epsilon() == pytest.approx(direct_epsilon(sigma, n, n, 3, delta), rel=1e-12)
    report = accountant.report(Config().privacy)
    assert report["rounds_with_failures"] == 3 and "users sampled" in report["denominator"]
    none_replied = PrivacyAccountant(n, delta)
    none_replied.compose_release(Release(1, "central", sigma, 1.0, sampled=n, replied=0))  # every sampled user failed
    assert none_replied.epsilon() == pytest.approx(direct_epsilon(sigma, n, n, 1, delta), rel=1e-12)


def test_a_ledger_written_before_the_fixed_denominator_replays_to_its_epsilon():
    """A checkpoint of the old mechanism (mean over the users that replied) holds entries with
    aggregated < sample_size, composed with sigma * aggregated / sample_size: resuming it must
    report the epsilon that run spent, recomputed here with dp-accounting directly."""
    sigma, n, m, delta = 1.2, 20, 4, 1e-3
    old = {"schema": 1, "accountant": "x", "population_size": n, "delta": delta, "last_clipping_norm": 1.0,
           "ledger": [{"noise_multiplier": sigma, "sample_size": m, "aggregated": 4, "rounds": 2},
                      {"noise_multiplier": sigma, "sample_size": m, "aggregated": 3, "rounds": 1}]}
    theirs = rdp.RdpAccountant(neighboring_relation=REPLACE_ONE)
    theirs.compose(dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(sigma / 2)), 2)
    theirs.compose(dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(sigma * 3 / 4 / 2)), 1)
    resumed = PrivacyAccountant.from_state(json.loads(json.dumps(old)))
    assert resumed.epsilon() == pytest.approx(theirs.get_epsilon(delta), rel=1e-12)
    assert resumed.report(Config().privacy)["rounds_with_failures"] == 1 and resumed.rounds == 3
    resumed.compose_round(sigma, m, replied=2)  # a new round: sigma, whoever failed
    theirs.compose(dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(sigma / 2)), 1)
    assert resumed.epsilon() == pytest.approx(theirs.get_epsilon(delta), rel=1e-12)
    assert resumed.report(Config().privacy)["rounds_with_failures"] == 2


def test_no_noise_means_infinite_epsilon_and_an_empty_ledger_none_spent():
    accountant = PrivacyAccountant(20, 1e-3)
    assert accountant.epsilon() == 0.0
    accountant.compose_round(0.0, 5)
    assert accountant.epsilon() == float("inf")
    assert accountant.report(Config().privacy)["epsilon"] is None  # JSON-safe


def test_calibration_hits_the_target_from_below():
    schedule = [(8, 10)]
    sigma = calibrate_noise(2.0, schedule, 100, 1e-3)
    spent = fedpeft_epsilon(sigma, 100, 10, 8, 1e-3)
    assert 0.99 * 2.0 <= spent <= 2.0
    assert direct_epsilon(sigma, 100, 10, 8, 1e-3) == pytest.approx(spent, rel=0.01)


def test_an_unreachable_target_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"privacy\.target_epsilon"):
        calibrate_noise(0.5, [(50, 50)], 50, 1e-4, max_noise_multiplier=2.0)


def test_report_names_the_sampling_model_the_sampler_uses():
    cfg = Config()
    cfg.federation.cohort_size = 4
    users = list(range(20))
    for r in range(1, 6):  # fixed size, no user twice: sampling without replacement
        cohort = Strategy(cfg).sample_cohort(users, r)
        assert len(cohort) == len(set(cohort)) == 4
    accountant = PrivacyAccountant(20, automatic_delta(20))
    accountant.compose_round(1.0, 4, count=3)
    report = accountant.report(cfg.privacy)
    assert "without replacement" in report["sampling_model"] and "poisson" not in report["sampling_model"].lower()
    assert report["sampling_rate"] == pytest.approx(0.2) and report["rounds_composed"] == 3
    assert set(report) >= {"mechanism", "noise_multiplier", "clipping_norm", "delta", "epsilon", "accountant"}


def test_delta_rule_and_its_bounds():
    """Automatic delta: min(1e-5, 1 / (10 n)), well below 1 / n at every n."""
    cfg = Config()
    assert resolve_delta(cfg.privacy, 20) == automatic_delta(20) == 1e-5
    assert automatic_delta(40) == 1e-5 and automatic_delta(10_000) == 1e-5
    assert automatic_delta(100_000) == pytest.approx(1e-6) and automatic_delta(3) == 1e-5
    cfg.privacy.delta = 1e-3
    assert resolve_delta(cfg.privacy, 40) == 1e-3
    cfg.privacy.delta = 0.05  # >= 1 / 40 users
    with pytest.raises(ConfigError, match=r"privacy\.delta.*min\(1e-5, 1 / \(10 x users\)\) = 1e-05"):
        resolve_delta(cfg.privacy, 40)
