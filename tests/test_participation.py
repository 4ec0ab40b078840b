"""Federations as they behave (fedpeft.federation.participation): users online with their own
probability, dropouts, speeds and a deadline, a simulated clock. The draws are recomputed here
from the documented rule (numpy's generator seeded by data.seed, a tag and the user id's CRC-32),
not through fedpeft's code; runs are on the in-process grid with the real ClientApp."""

from __future__ import annotations

import csv
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedpeft.config import Config, ConfigError
from fedpeft.config_checks import validate
from fedpeft.federation.checkpoint import resume_config
from fedpeft.federation.participation import Participation
from tests.inprocess_grid import run_in_process
from tests.test_resume import DriverKilled, KilledInRound3, assert_same_results

USERS = [f"user{i:04d}" for i in range(30)]


def draw(seed: int, tag: int, user: str) -> np.random.Generator:
    return np.random.default_rng([seed, tag, zlib.crc32(user.encode())])


def participation(rounds: int, seed: int = 0, **federation) -> Participation:
    cfg = Config()
    cfg.data.seed = seed
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    return Participation(cfg, USERS, rounds)


def test_each_users_online_fraction_is_its_probability():
    rounds = 4000
    for spec, prob in (("beta:2,2", lambda u: draw(3, 70, u).beta(2, 2)),
                       ("uniform:0.2,0.8", lambda u: draw(3, 70, u).uniform(0.2, 0.8)),
                       ("const:0.3", lambda u: 0.3)):
        p = participation(rounds, seed=3, availability=spec)
        expected = np.array([prob(u) for u in USERS])
        assert np.allclose(p.probability, expected)
        fraction = np.array([len([r for r in range(1, rounds + 1) if i in p.online([i], r)]) for i in range(len(USERS))]) / rounds
        tolerance = 4.5 * np.sqrt(expected * (1 - expected) / rounds)  # 4.5 standard errors, per user
        assert np.all(np.abs(fraction - expected) <= tolerance), (spec, np.abs(fraction - expected).max())


def test_the_draws_depend_on_data_seed_and_the_user_alone():
    a = participation(50, seed=1, availability="beta:1,3", dropout_rate=0.2, speed="lognormal:0.5")
    cfg = Config()
    cfg.data.seed, cfg.seed, cfg.federation.strategy = 1, 99, "fedsa"  # another model seed and strategy
    cfg.federation.availability, cfg.federation.dropout_rate, cfg.federation.speed = "beta:1,3", 0.2, "lognormal:0.5"
    b = Participation(cfg, USERS[::-1], 50)  # the same users in another order
    assert np.array_equal(a.online_table, b.online_table[::-1]) and np.allclose(a.speed, b.speed[::-1])
    assert [USERS[u] for u in a.dropped_out(list(range(30)), 7)] == sorted(USERS[::-1][u] for u in b.dropped_out(list(range(30)), 7))
    assert not np.array_equal(a.online_table, participation(50, seed=2, availability="beta:1,3").online_table)
    speeds = [math.exp(draw(1, 73, u).normal(0.0, 0.5)) for u in USERS]
    assert np.allclose(a.speed, speeds)
    dropped = [sum(d.random() < 0.2 for d in [np.random.default_rng([1, 72, zlib.crc32(u.encode()), r]) for r in range(1, 2001)])
               for u in USERS[:3]]
    assert all(abs(k / 2000 - 0.2) < 4.5 * math.sqrt(0.16 / 2000) for k in dropped)


@pytest.mark.parametrize("key, value, message", [
    ("availability", "sometimes", "not a form fedpeft knows"),
    ("availability", "beta:2", "beta takes 2 number"),
    ("availability", "const:1.5", "a probability in (0, 1]"),
    ("speed", "lognormal:-1", "sigma >= 0"),
    ("dropout_rate", 1.0, "dropout_rate"),
])
def test_bad_forms_are_one_line_errors(key, value, message):
    cfg = Config()
    setattr(cfg.federation, key, value)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        validate(cfg)
    assert "\n" not in str(err.value)


def write_trace(path: Path, rows: list[list[str]]) -> str:
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return f"trace:{path}"


def test_a_trace_file_is_read_as_given_and_bad_ones_are_refused(tmp_path):
    good = [["user", "1", "2", "3"], *[[u, "1", str(i % 2), "0"] for i, u in enumerate(USERS)]]
    p = participation(3, availability=write_trace(tmp_path / "t.csv", good))
    assert p.online(list(range(30)), 1) == list(range(30)) and p.online(list(range(30)), 2) == list(range(1, 30, 2))
    assert p.online(list(range(30)), 3) == [] and np.allclose(p.probability[1], 2 / 3)
    cases = {
        "names user 'stranger', who is not in the benchmark": [*good, ["stranger", "1", "1", "1"]],
        "include rounds out of range [4]": [["user", "1", "2", "3", "4"], *[[u, "1", "1", "1", "1"] for u in USERS]],
        "must hold one 0 or 1 per round": [good[0], [USERS[0], "1", "yes", "0"], *good[2:]],
        "has no row for 1 user(s)": good[:-1],
    }
    for i, (message, rows) in enumerate(cases.items()):
        with pytest.raises(ConfigError, match=re.escape(message)):
            participation(3, availability=write_trace(tmp_path / f"bad{i}.csv", rows))


def test_a_round_with_nobody_online_and_an_impossible_deadline_are_refused():
    p = participation(200, availability="const:0.01")
    with pytest.raises(ConfigError, match=r"no user is online in round \d+ .*Raise the availability or use fewer rounds"):
        p.check(list(range(30)), {})
    p = participation(3, deadline=5.0)
    with pytest.raises(ConfigError, match=r"federation.deadline=5 simulated seconds: no user can meet it \(the fastest takes 8.0 s"):
        p.check(list(range(30)), {u: 8 for u in range(30)})


def run_config(tiny_bert: Path, out: Path, name: str, strategy: str = "fedavg", **federation) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds = strategy, 4
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.val_per_user, cfg.data.test_per_user = 8, 8, 2, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 2, 4, 0.05  # 8 examples per call, every call
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(out), name, False
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    validate(cfg)
    return cfg


def per_user(run: Path) -> dict[str, dict[str, str]]:
    with (run / "per_user.csv").open() as f:
        return {row["user_id"]: row for row in csv.DictReader(f)}


def rounds_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_the_defaults_change_nothing(tiny_bert, tmp_path):
    """const:1, no dropouts, speed const:1, no deadline: the files of a run without these options."""
    run_in_process(run_config(tiny_bert, tmp_path, "plain"))
    run_in_process(run_config(tiny_bert, tmp_path, "spelled", availability="const:1.0", speed="const:1"))
    for name in ("per_user.csv", "predictions.jsonl", "rounds_per_user.jsonl", "shared_final.safetensors"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "spelled" / name).read_bytes(), name
    assert "availability" not in next(iter(per_user(tmp_path / "plain").values()))
    assert "sim_time" not in rounds_log(tmp_path / "plain")[0]


def test_users_train_in_the_rounds_they_are_online_in_every_strategy(tiny_bert, tmp_path):
    spec = "beta:1,1"
    online = {u: [draw(0, 71, u).random(4)[r] < draw(0, 70, u).beta(1, 1) for r in range(4)] for u in USERS[:8]}
    trained = {}
    for strategy in ("local_only", "fedavg"):
        results, run = run_in_process(run_config(tiny_bert, tmp_path, strategy, strategy, availability=spec))
        rows = per_user(run)
        trained[strategy] = {u: int(r["rounds_trained"]) for u, r in rows.items()}
        assert trained[strategy] == {u: sum(online[u]) for u in USERS[:8]}  # cohort_fraction 1: everyone online trains
        assert [r["online"] for r in rounds_log(run)] == [sum(online[u][r] for u in USERS[:8]) for r in range(4)]
        assert float(rows["user0003"]["availability"]) == pytest.approx(draw(0, 70, "user0003").beta(1, 1))
        assert results["participation"]["availability"] == spec and results["by_participation"]
    assert trained["local_only"] == trained["fedavg"]


def test_a_deadline_drops_exactly_the_users_too_slow_for_it(tiny_bert, tmp_path):
    speeds = {u: math.exp(draw(0, 73, u).normal(0.0, 1.0)) for u in USERS[:8]}
    seconds = {u: 8 / s for u, s in speeds.items()}  # 8 examples per call, at 1 example per second at speed 1
    deadline = float(np.median(list(seconds.values())))
    slow = {u for u, t in seconds.items() if t > deadline}
    results, run = run_in_process(run_config(tiny_bert, tmp_path, "deadline", speed="lognormal:1", deadline=deadline))
    rows = per_user(run)
    assert {u for u, r in rows.items() if int(r["rounds_dropped"]) == 4} == slow and len(slow) == 4
    assert all(int(rows[u]["rounds_trained"]) == 4 for u in set(rows) - slow)
    assert all(int(rows[u]["rounds_trained"]) == 0 and int(rows[u]["failed_calls"]) == 0 for u in slow)
    log = rounds_log(run)
    assert [r["late"] for r in log] == [4] * 4 and [r["trained"] for r in log] == [4] * 4 and [r["failed"] for r in log] == [0] * 4
    assert [r["sim_time"] for r in log] == pytest.approx([deadline * k for k in range(1, 5)])  # someone missed it each round
    assert results["status"] == "ok" and results["participation"]["late"] == 16


def test_no_deadline_the_clock_waits_for_the_slowest(tiny_bert, tmp_path):
    slowest = max(8 / math.exp(draw(0, 73, u).normal(0.0, 0.5)) for u in USERS[:8])
    _, run = run_in_process(run_config(tiny_bert, tmp_path, "clock", speed="lognormal:0.5"))
    assert [r["round_sim_seconds"] for r in rounds_log(run)] == pytest.approx([slowest] * 4)


def test_dropouts_and_availability_resume_to_the_uninterrupted_run(tiny_bert, tmp_path):
    options = {"availability": "uniform:0.5,1", "dropout_rate": 0.25, "speed": "lognormal:0.5", "cohort_fraction": 0.5}
    run_in_process(run_config(tiny_bert, tmp_path, "whole", **options))
    with pytest.raises(DriverKilled):
        run_in_process(run_config(tiny_bert, tmp_path, "killed", **options), grid_class=KilledInRound3)
    run_in_process(resume_config(tmp_path / "killed", [], [("output.progress", "false")]), resume=True)
    assert_same_results(tmp_path / "killed", tmp_path / "whole")
    log = rounds_log(tmp_path / "whole")
    assert sum(r["dropped_out"] for r in log) > 0 and log[-1]["sim_time"] == pytest.approx(sum(r["round_sim_seconds"] for r in log))


def test_under_privacy_a_dropout_is_a_zero_update_and_costs_the_same_epsilon(tiny_bert, tmp_path):
    private = {"strategy": "fedavg"}
    eps = {}
    for name, rate in (("none", 0.0), ("dropouts", 0.4)):
        cfg = run_config(tiny_bert, tmp_path, name, **private, dropout_rate=rate)
        cfg.privacy.mechanism, cfg.privacy.noise_multiplier, cfg.privacy.clipping_norm = "central", 1.0, 1.0
        results, run = run_in_process(cfg)
        eps[name] = results["privacy"]["epsilon"]
        if rate:
            assert sum(r["dropped_out"] for r in rounds_log(run)) > 0
    assert eps["dropouts"] == eps["none"]  # the mean divides by the users sampled; who drops out is free of epsilon
    cfg = run_config(tiny_bert, tmp_path, "x")
    cfg.federation.availability, cfg.privacy.mechanism = "beta:2,2", "central"
    with pytest.raises(ConfigError, match="not the uniform sampling of all users that the privacy accountant assumes"):
        validate(cfg)



def test_partial_stragglers_run_the_steps_that_fit_and_are_kept(tiny_bert, tmp_path):
    speeds = {u: math.exp(draw(0, 73, u).normal(0.0, 1.0)) for u in USERS[:8]}
    deadline = float(np.median([8 / s for s in speeds.values()]))
    # 8 examples, batches of 4, 2 steps: a user runs the steps whose 4 examples each fit deadline x speed
    steps = {u: min(2, int(deadline * s // 4)) for u, s in speeds.items()}
    assert sorted(set(steps.values())) == [0, 1, 2]  # the fixture has users of every kind
    results, run = run_in_process(run_config(tiny_bert, tmp_path, "partial", speed="lognormal:1", deadline=deadline,
                                             stragglers="partial"))
    rows = per_user(run)
    for u, k in steps.items():
        assert int(rows[u]["examples_processed"]) == 4 * k * 4, (u, k)  # 4 rounds of k steps of 4 examples
        assert int(rows[u]["rounds_trained"]) == (4 if k else 0) and int(rows[u]["rounds_dropped"]) == (0 if k else 4)
    log = rounds_log(run)
    assert [r["late"] for r in log] == [sum(k == 0 for k in steps.values())] * 4
    assert all(r["round_sim_seconds"] == pytest.approx(deadline) for r in log)  # someone could not reply in time
    assert results["participation"]["stragglers"] == "partial"
    cfg = run_config(tiny_bert, tmp_path, "x")
    cfg.federation.stragglers, cfg.train.pack_users = "partial", 2
    with pytest.raises(ConfigError, match="stragglers=partial gives each late user its own number of steps"):
        validate(cfg)
