import numpy as np

from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.data.synthetic import SyntheticBenchmark


def bench(**data) -> SyntheticBenchmark:
    cfg = Config()
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return SyntheticBenchmark(cfg)


def test_same_seed_same_users_other_seed_other_users():
    a, b, c = bench(seed=3), bench(seed=3), bench(seed=4)
    assert [a.load_user(i) for i in range(5)] == [b.load_user(i) for i in range(5)]
    assert a.load_user(0) != c.load_user(0)


def test_a_user_does_not_depend_on_how_many_users_exist():
    assert bench(num_users=5).load_user(3) == bench(num_users=50).load_user(3)


def test_split_sizes_and_disjoint_examples():
    u = bench(train_per_user=10, val_per_user=3, test_per_user=7).load_user(2)
    assert (len(u.train), len(u.val), len(u.test)) == (10, 3, 7)
    ids = [e.id for e in u.train + u.val + u.test]
    assert len(set(ids)) == len(ids)


def test_users_disagree_on_the_same_inputs():
    b = bench(num_users=20)
    labels: dict[str, set] = {}
    for i in range(20):
        u = b.load_user(i)
        for ex in u.train + u.val + u.test:
            labels.setdefault(ex.text, set()).add(ex.labels[0])
    shared = [s for s in labels.values() if len(s) >= 1]
    assert sum(len(s) > 1 for s in shared) > len(shared) * 0.2


def test_same_persona_users_agree_more_than_others():
    b = bench(num_users=40, noise=0.1)
    tables = {i: b.user_table(i) for i in range(40)}
    same, diff = [], []
    for i in range(40):
        for j in range(i + 1, 40):
            agree = float(np.mean(tables[i] == tables[j]))
            (same if b.persona_of(i) == b.persona_of(j) else diff).append(agree)
    assert np.mean(same) > 0.7 > np.mean(diff) + 0.2


def test_get_benchmark_caches_per_data_config():
    cfg = Config()
    assert get_benchmark(cfg) is get_benchmark(cfg)
