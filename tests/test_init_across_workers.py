"""The common init is the same in every Ray worker process, for every PEFT method.

Strategies that keep part of the adapter at its common initialisation (ffa's frozen LoRA A; the
init every user's private part starts from) rely on each worker rebuilding it bit for bit. Two
Ray actors (two processes) build the model for every method; their hashes must agree, and differ
from a build with another seed (so the comparison is not vacuous).
"""

from __future__ import annotations

import hashlib

import pytest

from fedpeft.learning.peft_methods import METHODS, NO_TRAINING

pytestmark = pytest.mark.slow

TRAINED = [m for m in METHODS if m not in NO_TRAINING]


def init_hashes(model_path: str, seed: int) -> tuple[int, dict[str, dict[str, str]]]:
    """(this process's pid, method -> adapter key -> sha256 of the initial tensor)."""
    import os

    from fedpeft.config import Config
    from fedpeft.learning.models import build_model

    out = {}
    for method in TRAINED:
        cfg = Config()
        cfg.model.name, cfg.peft.method, cfg.seed, cfg.peft.num_virtual_tokens = model_path, method, seed, 4
        init = build_model(cfg, 3).init_state
        out[method] = {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in init.items()}
    return os.getpid(), out


class Worker:
    def hashes(self, model_path: str, seed: int) -> tuple[int, dict[str, dict[str, str]]]:
        return init_hashes(model_path, seed)


def test_common_init_is_identical_in_two_worker_processes(tiny_bert, ray_shutdown):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    worker = ray.remote(num_cpus=1)(Worker)
    first, second = worker.remote(), worker.remote()  # two actors: two processes
    (pid_a, a), (pid_b, b) = ray.get([first.hashes.remote(str(tiny_bert), 0), second.hashes.remote(str(tiny_bert), 0)])
    _, other = ray.get(first.hashes.remote(str(tiny_bert), 1))
    assert pid_a != pid_b, "both builds ran in one process"
    for method in TRAINED:
        assert a[method], method
        assert a[method] == b[method], f"{method}: the common init differs between worker processes"
        assert a[method] != other[method], f"{method}: another seed gives the same init"
