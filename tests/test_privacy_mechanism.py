"""The DP mechanism on numbers: Strategy.aggregate with privacy on, on hand-built Flower replies (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import fedavg as flower_fedavg
from scipy.stats import chi2

from fedpeft.cli import build_parser
from fedpeft.config import Config, ConfigError
from fedpeft.config_load import build_config
from fedpeft.federation.privacy import clip_shared_update
from fedpeft.federation.privacy_checks import prepare_privacy
from fedpeft.strategies import make_strategy
from fedpeft.strategies.base import Strategy

C = 0.5  # the clipping norm of these tests
KEYS = [f"base_model.model.encoder.layer.{i}.attention.self.query.lora_{ab}.default.weight" for i in range(2) for ab in "AB"]


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built outside a running Flower app need a task identity, as run_simulation sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def reply(state: dict[str, np.ndarray], n: float = 1.0) -> Message:
    content = RecordDict({"shared": ArrayRecord(torch_state_dict={k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": float(n)})})
    return Message(content=content, dst_node_id=1, message_type="train")


def dp_config(mechanism: str, sigma: float, **privacy) -> Config:
    cfg = Config()
    cfg.federation.strategy = "fedavg"
    cfg.privacy.mechanism, cfg.privacy.noise_multiplier, cfg.privacy.clipping_norm = mechanism, sigma, C
    privacy.setdefault("clipped_count_stddev", 1.0)  # adaptive: Flower's default, sampled / 20, allows sigma < 0.3 here
    for key, value in privacy.items():
        setattr(cfg.privacy, key, value)
    return cfg


def clipped(update: np.ndarray, bound: float = C) -> np.ndarray:
    return update * min(1.0, bound / np.linalg.norm(update))


def updates(seed: int = 0, d: int = 50, scales=(0.02, 0.2, 1.5)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=d) * s for s in scales]  # norms about 0.14, 1.4, 10.6: one inside the ball, two clipped


def sent(mechanism: str, update: np.ndarray, start: np.ndarray) -> dict[str, np.ndarray]:
    """What a client replies: its new shared part (clipped by the client itself under mechanism=client)."""
    new = {"w": torch.tensor(start + update, dtype=torch.float32)}
    if mechanism == "client":
        new = clip_shared_update(new, {"w": torch.tensor(start, dtype=torch.float32)}, C)
    return {k: v.numpy() for k, v in new.items()}


@pytest.mark.parametrize("mechanism", ["central", "central_adaptive", "client"])
def test_every_update_that_reaches_the_mean_is_clipped_and_weighed_equally(mechanism, monkeypatch):
    seen: list[tuple[str, list[RecordDict]]] = []
    original = flower_fedavg.aggregate_arrayrecords

    def recording(records, weighting_metric_name):  # Flower's own averaging, watched
        seen.append((weighting_metric_name, records))
        return original(records, weighting_metric_name)

    monkeypatch.setattr(flower_fedavg, "aggregate_arrayrecords", recording)
    start = np.linspace(-1, 1, 50)
    replies = [reply(sent(mechanism, u, start), n) for u, n in zip(updates(), (5, 1, 14))]
    Strategy(dp_config(mechanism, 0.7)).aggregate(1, {"w": torch.tensor(start, dtype=torch.float32)}, replies, sampled=3)
    (key, inputs), (_, outer) = seen  # the DP wrapper's equal-weight mean, then the server optimiser on it
    assert len(inputs) == 3 and len(outer) == 1
    for record in inputs:
        assert next(iter(record.metric_records.values()))[key] == 1.0  # equal weights, not num-examples
        update = record.array_records["shared"]["w"].numpy() - start.astype(np.float32)
        assert np.linalg.norm(update) <= C * (1 + 1e-5)
    assert max(np.linalg.norm(r.array_records["shared"]["w"].numpy() - start) for r in inputs) > 0.99 * C  # clipped, not shrunk


@pytest.mark.parametrize("mechanism", ["central", "central_adaptive", "client"])
def test_without_noise_the_aggregate_is_the_clipped_equal_weight_mean(mechanism):
    ups, counts = updates(1), (5, 1, 14)
    start = np.zeros(50)
    out = Strategy(dp_config(mechanism, 0.0)).aggregate(
        1, {"w": torch.zeros(50)}, [reply(sent(mechanism, u, start), n) for u, n in zip(ups, counts)], sampled=3)
    by_hand = np.mean([clipped(u) for u in ups], axis=0)
    np.testing.assert_allclose(out["w"].numpy(), by_hand, atol=1e-6)
    weighted = sum(clipped(u) * n for u, n in zip(ups, counts)) / sum(counts)
    assert not np.allclose(out["w"].numpy(), weighted, atol=1e-3)  # the example-weighted mean would differ


def test_an_update_of_exactly_zero_is_averaged_not_a_division_by_zero():
    """Flower's server-side clipping divides by the update's norm (fedsa's LoRA A is unchanged
    after one step from B = 0)."""
    ups = [np.zeros(50), *updates(2)[1:]]
    for mechanism in ("central", "central_adaptive"):
        out = Strategy(dp_config(mechanism, 0.0)).aggregate(1, {"w": torch.zeros(50)}, [reply({"w": u}) for u in ups], sampled=3)
        np.testing.assert_allclose(out["w"].numpy(), np.mean([ups[0], *[clipped(u) for u in ups[1:]]], axis=0), atol=1e-6)


def promised_std(mechanism: str, sigma: float, sampled: int, count_stddev: float) -> float:
    """sigma * C / users sampled; adaptive: Flower gives the updates sigma_z with
    sigma_z^-2 + (2 sigma_b)^-2 = sigma^-2 (Andrew et al.), the rest going to the clipped count."""
    if mechanism == "central_adaptive":
        sigma = (sigma**-2 - (2 * count_stddev) ** -2) ** -0.5
    return sigma * C / sampled


@pytest.mark.parametrize("mechanism", ["central", "central_adaptive", "client"])
@pytest.mark.parametrize("replied", [4, 3])  # 3: one sampled user failed; the sum is still over 4
def test_noise_has_the_promised_standard_deviation(mechanism, replied):
    """40 seeded rounds x 100 coordinates = 4000 draws of aggregate - clipped sum / sampled. Tolerance: the
    sum of squares over the promised variance must lie in the central 99.8% of chi-square(4000),
    i.e. the measured std within about 3.5% of the promised one."""
    sigma, sampled, d, rounds, count_stddev = 0.8, 4, 100, 40, 1.0
    ups = updates(3, d, scales=(0.01, 0.1, 0.3, 1.0))[:replied]  # norms 0.1 to 10 against C = 0.5
    start = np.zeros(d)
    mean = np.sum([clipped(u) for u in ups], axis=0) / sampled  # a failed user adds zero
    draws = []
    for server_round in range(1, rounds + 1):  # a fresh strategy each time: the round's clipping norm is C
        strategy = Strategy(dp_config(mechanism, sigma, clipped_count_stddev=count_stddev))
        out = strategy.aggregate(server_round, {"w": torch.zeros(d)}, [reply(sent(mechanism, u, start)) for u in ups],
                                 sampled=sampled)
        draws.append(out["w"].numpy() - mean)
        assert strategy.privacy_release.sampled == sampled and strategy.privacy_release.replied == replied
    draws = np.concatenate(draws)
    statistic = float(np.sum(draws**2)) / promised_std(mechanism, sigma, sampled, count_stddev) ** 2
    assert chi2.ppf(0.001, draws.size) <= statistic <= chi2.ppf(0.999, draws.size), draws.std()


def seeded_gaussian(seed: int, server_round: int, shapes: list[tuple[int, ...]], std: float) -> list[np.ndarray]:
    """The documented noise stream (fedpeft.federation.privacy: numpy's global generator seeded from
    (seed, 50, round)), drawn as numpy draws a normal: one array per key, in the keys' order."""
    rng = np.random.RandomState(np.random.SeedSequence([seed, 50, server_round]).generate_state(4))
    return [rng.normal(0, std, shape) for shape in shapes]


@pytest.mark.parametrize("mechanism", ["central", "client"])
@pytest.mark.parametrize("replied", [5, 3, 1, 0])  # of 5 sampled; 0: every sampled user failed
def test_the_aggregate_is_the_clipped_sum_over_the_users_sampled_plus_the_noise(mechanism, replied):
    """A plain numpy reference: current + (sum of the repliers' clipped updates + zeros) / m +
    N(0, (sigma C / m)^2), the noise drawn from the same seeded stream. The mean over the users
    that replied (the old mechanism) differs by far more than the tolerance."""
    sigma, sampled, seed, server_round = 0.9, 5, 3, 7
    cfg = dp_config(mechanism, sigma)
    cfg.federation.strategy, cfg.seed = "fedsa", seed  # shares LoRA A, keeps B private
    strategy = make_strategy(cfg)
    shared = [k for k in KEYS if ".lora_A." in k]
    rng = np.random.default_rng(11)
    start = rng.normal(size=24)  # the two shared 3 x 4 matrices, flattened in key order
    ups = [rng.normal(size=24) * s for s in (0.01, 0.1, 0.3, 1.0, 2.0)][:replied]  # norms 0.05 to 10 against C = 0.5
    as_state = lambda flat: {k: flat[i * 12:(i + 1) * 12].reshape(3, 4) for i, k in enumerate(shared)}  # noqa: E731
    replies = [reply(as_state(start + (clipped(u) if mechanism == "client" else u))) for u in ups]
    out = strategy.aggregate(server_round, {k: torch.tensor(v, dtype=torch.float32) for k, v in as_state(start).items()},
                             replies, sampled=sampled, phase="federated")
    total = np.sum([clipped(u) for u in ups], axis=0) if ups else np.zeros(24)
    noise = np.concatenate([n.ravel() for n in seeded_gaussian(seed, server_round, [(3, 4)] * 2, sigma * C / sampled)])
    got = np.concatenate([out[k].numpy().ravel() for k in shared])
    np.testing.assert_allclose(got, start.astype(np.float32) + total / sampled + noise, atol=2e-6)
    assert strategy.privacy_release.sampled == sampled and strategy.privacy_release.replied == replied
    if 0 < replied < sampled:  # the mean over the users that replied is far from it
        assert np.abs(got - (start + total / replied + noise)).max() > 1e-2


@pytest.mark.parametrize("mechanism", ["central", "central_adaptive", "client"])
def test_without_noise_failed_users_are_zero_updates_and_none_replied_keeps_the_shared_part(mechanism):
    ups = [clipped(u) if mechanism == "client" else u for u in updates(6)]
    strategy = make_strategy(dp_config(mechanism, 0.0, clipped_count_stddev=1e-12))
    out = strategy.aggregate(1, {"w": torch.zeros(50)}, [reply({"w": u}) for u in ups[:2]], sampled=4)  # 2 of 4 failed
    np.testing.assert_allclose(out["w"].numpy(), (clipped(ups[0]) + clipped(ups[1])) / 4, atol=1e-6)
    fedavg = make_strategy(dp_config(mechanism, 0.0, clipped_count_stddev=1e-12))
    start = {k: torch.full((3, 4), 0.25) for k in KEYS}
    kept = fedavg.aggregate(1, start, [], sampled=4, phase="federated")  # nobody replied: a release all the same
    assert fedavg.privacy_release is not None and fedavg.privacy_release.replied == 0
    assert all(torch.equal(kept[k], start[k]) for k in KEYS)


def test_noise_is_seeded_by_run_and_round_and_leaves_numpy_alone():
    cfg, ups = dp_config("central", 1.0), updates(4)

    def run(server_round: int, seed: int = 0) -> np.ndarray:
        cfg.seed = seed
        return Strategy(cfg).aggregate(server_round, {"w": torch.zeros(50)}, [reply({"w": u}) for u in ups], sampled=3)["w"].numpy()

    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = run(2)
    assert np.array_equal(np.random.get_state()[1], before)  # Flower's global generator restored
    assert np.array_equal(first, run(2))  # a resumed round draws the same noise
    assert not np.allclose(first, run(3)) and not np.allclose(first, run(2, seed=1))


def test_adaptive_clipping_norm_moves_to_the_target_quantile_and_resumes():
    """Updates of norms 1..5 and target quantile 0.5: the norm should settle near the median, 3
    (Flower 1.42's server-side wrapper, which counts clipped updates, drives it towards 0)."""
    cfg = dp_config("central_adaptive", 0.0, clipping_norm=1.0)
    ups = [np.full(4, n / 2) for n in (1, 2, 3, 4, 5)]  # L2 norms 1, 2, 3, 4, 5

    def step(strategy: Strategy, server_round: int) -> np.ndarray:
        return strategy.aggregate(server_round, {"w": torch.zeros(4)}, [reply({"w": u}) for u in ups], sampled=5)["w"].numpy()

    straight = Strategy(cfg)
    for r in range(1, 41):
        last = step(straight, r)
    assert 2.5 <= straight.privacy_release.clipping_norm <= 3.5
    first = Strategy(cfg)
    for r in range(1, 21):
        step(first, r)
    resumed = Strategy(cfg)
    resumed.load_server_state(first.server_state())  # the checkpoint's server state holds the norm
    for r in range(21, 41):
        again = step(resumed, r)
    np.testing.assert_array_equal(again, last)


def andrew_clipping_norms(norms: list[float], clipped_quantile: float, start: float, lr: float, rounds: int) -> list[float]:
    """Andrew et al. (2021), noise off, in plain python: each round clips to C, then
    C <- C * exp(-lr * (fraction of updates with norm <= C - (1 - clipped quantile))). The norm
    each round clipped to."""
    norm, out = start, []
    for _ in range(rounds):
        out.append(norm)
        unclipped = sum(1 for n in norms if n <= norm) / len(norms)
        norm *= math.exp(-lr * (unclipped - (1 - clipped_quantile)))
    return out


@pytest.mark.parametrize("quantile, failed, settles_in", [
    (0.2, False, (8, 9)), (0.8, False, (2, 3)),  # 20% of 10 updates clipped: C between the 8th and 9th norm
    (0.2, True, (8, 9)), (0.8, True, (2, 3)),  # the user of norm 1 failed: a zero update, unclipped
])
def test_adaptive_clipping_settles_at_the_target_quantile_as_andrew_et_al(quantile, failed, settles_in):
    """Norms 1..10 (one user failed: 0, 2..10), target clipped quantile 0.2 or 0.8, noise off:
    each round's clipping norm equals the plain loop's; 0.2 and 0.8 settle at different norms, so
    a swapped q <-> 1 - q fails. With the failed user's zero update counted as clipped, 0.8
    would settle between 3 and 4."""
    rounds, start = 80, 5.0
    cfg = dp_config("central_adaptive", 0.0, clipping_norm=start, target_clipped_quantile=quantile,
                    clipped_count_stddev=1e-12)  # the clipped count's noise, off (0 means Flower's default)
    norms = [float(n) for n in range(1, 11)]
    sent_norms = norms[1:] if failed else norms
    strategy = Strategy(cfg)
    seen = []
    for r in range(1, rounds + 1):
        strategy.aggregate(r, {"w": torch.zeros(4)}, [reply({"w": np.full(4, n / 2)}) for n in sent_norms], sampled=10)
        seen.append(strategy.privacy_release.clipping_norm)
    expected = andrew_clipping_norms([0.0, *sent_norms] if failed else norms, quantile, start, cfg.privacy.clip_norm_lr, rounds)
    assert seen == pytest.approx(expected, rel=1e-9)
    low, high = settles_in
    assert all(low <= c < high for c in seen[-20:]), seen[-20:]


def test_client_clip_bounds_the_update_and_keeps_one_inside_the_ball():
    reference = {k: torch.randn(3, 4) for k in KEYS}
    far = {k: v + 5 * torch.randn(3, 4) for k, v in reference.items()}
    out = clip_shared_update(far, reference, C)
    norm = math.sqrt(sum(float((out[k] - reference[k]).double().pow(2).sum()) for k in KEYS))
    assert norm == pytest.approx(C, rel=1e-5)
    near = {k: v + 1e-3 for k, v in reference.items()}
    kept = clip_shared_update(near, reference, C)
    assert all(kept[k] is near[k] for k in KEYS)  # unchanged, not rebuilt
    narrow = clip_shared_update({k: v.bfloat16() for k, v in far.items()}, reference, C)
    assert all(v.dtype == torch.float32 for v in narrow.values())  # travels exactly as clipped


def test_the_server_refuses_an_unclipped_update_under_client_clipping():
    with pytest.raises(RuntimeError, match="clip_shared_update"):
        Strategy(dp_config("client", 1.0)).aggregate(1, {"w": torch.zeros(50)}, [reply({"w": u}) for u in updates(5)], sampled=3)


def test_only_shared_keys_pass_the_privacy_layer():
    cfg = dp_config("central", 0.5)
    cfg.federation.strategy = "fedsa"
    strategy = make_strategy(cfg)
    state = {k: torch.randn(3, 4) for k in KEYS}
    shared, private = strategy.split(state, "federated")
    assert shared and private and not set(shared) & set(private)
    out = strategy.aggregate(1, shared, [reply({k: v.numpy() + 0.1 for k, v in shared.items()}) for _ in range(2)], sampled=2)
    assert set(out) == set(shared)  # the private LoRA B never reaches the server, nor comes back noised
    with pytest.raises(RuntimeError, match="shared keys"):  # a reply with a key the server does not share
        strategy.aggregate(2, shared, [reply({k: v.numpy() for k, v in state.items()})], sampled=1)


def test_aggregate_under_privacy_needs_the_number_sampled():
    with pytest.raises(ValueError, match="sampled"):
        Strategy(dp_config("central", 1.0)).aggregate(1, {"w": torch.zeros(50)}, [reply({"w": updates()[0]})])


@pytest.mark.parametrize("override, key", [
    ("privacy.clipping_norm=0", "privacy.clipping_norm"),
    ("privacy.clipping_norm=-1", "privacy.clipping_norm"),
    ("privacy.noise_multiplier=-0.5", "privacy.noise_multiplier"),
    ("privacy.mechanism=local", "privacy.mechanism"),
    ("privacy.target_epsilon=-1", "privacy.target_epsilon"),
    ("privacy.max_epsilon=-2", "privacy.max_epsilon"),
    ("privacy.delta=1.5", "privacy.delta"),
    ("privacy.noise_multiplier=nan", "privacy.noise_multiplier"),
])
def test_bad_privacy_values_are_refused_naming_the_key(override, key):
    key_value = override.split("=", 1)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        build_config(overrides=[("privacy.mechanism", "central"), (key_value[0], key_value[1])])
    if key == "privacy.mechanism":
        assert all(m in str(err.value) for m in ("none", "central", "central_adaptive", "client"))


def test_a_target_without_a_mechanism_is_refused():
    with pytest.raises(ConfigError, match=r"privacy\.target_epsilon"):
        build_config(overrides=[("privacy.target_epsilon", "2")])


@pytest.mark.parametrize("strategy", ["local_only", "fedavg_ft"])
def test_strategies_privacy_cannot_apply_to_are_refused_before_ray(strategy):
    cfg = build_config(overrides=[("federation.strategy", strategy), ("privacy.mechanism", "central")])
    with pytest.raises(ConfigError, match=r"privacy\.mechanism") as err:
        prepare_privacy(cfg, make_strategy(cfg), KEYS, 20)
    assert strategy in str(err.value) and "fedavg" in str(err.value).split("one of", 1)[1]


def test_prepare_resolves_delta_and_calibrates_the_noise_into_the_config():
    cfg = build_config(overrides=[("federation.strategy", "fedavg"), ("privacy.mechanism", "central"),
                                  ("privacy.target_epsilon", "4"), ("federation.rounds", "3")])
    prepare_privacy(cfg, make_strategy(cfg), KEYS, 10)  # everyone every round: fast to account
    assert cfg.privacy.delta == pytest.approx(1e-5)  # min(1e-5, 1 / (10 x 10 users))
    assert cfg.privacy.noise_multiplier != 1.0
    from fedpeft.federation.privacy_accounting import PrivacyAccountant

    accountant = PrivacyAccountant(10, cfg.privacy.delta)
    accountant.compose_round(cfg.privacy.noise_multiplier, 10, count=3)
    assert 0.99 * 4 <= accountant.epsilon() <= 4
    bad = build_config(overrides=[("federation.strategy", "fedavg"), ("privacy.mechanism", "central"), ("privacy.delta", "0.2")])
    with pytest.raises(ConfigError, match=r"privacy\.delta"):
        prepare_privacy(bad, make_strategy(bad), KEYS, 10)


def test_adaptive_noise_above_what_the_count_noise_allows_is_refused():
    cfg = build_config(overrides=[("federation.strategy", "fedavg"), ("privacy.mechanism", "central_adaptive"),
                                  ("privacy.noise_multiplier", "1.0"), ("federation.cohort_size", "8")])
    with pytest.raises(ConfigError, match=r"privacy\.clipped_count_stddev"):  # default 8 / 20 = 0.4: sigma must stay < 0.8
        prepare_privacy(cfg, make_strategy(cfg), KEYS, 20)


def test_help_lists_the_privacy_keys():
    text = build_parser().format_help()
    for key in ("mechanism", "noise_multiplier", "clipping_norm", "delta", "target_epsilon", "max_epsilon",
                "target_clipped_quantile", "clip_norm_lr", "clipped_count_stddev"):
        assert f"--privacy.{key}" in text
