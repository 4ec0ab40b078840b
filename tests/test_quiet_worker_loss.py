"""Issue 29: a call that ``federation.call_timeout`` ends used to print Flower's ERROR records
with a Ray traceback (three per call that reached the lost worker, restarts included), even
when the run succeeds. They are dropped; the failure is still recorded and counted, and every
other error Flower logs still shows. The end-to-end case (a real call timeout under
``python -m fedpeft.sim``) is tests/test_faults.py's call-timeout test."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.common.logger import log

from fedpeft.config import Config
from tests.inprocess_grid import run_in_process
from tests.test_faults import faulty  # noqa: F401  (the fixture)

REPO = Path(__file__).resolve().parents[1]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_flowers_records_about_a_lost_worker_are_dropped_and_other_errors_kept(tiny_bert, tmp_path):
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    cfg = Config()
    cfg.model.name, cfg.output.dir, cfg.output.name, cfg.output.progress = str(tiny_bert), str(tmp_path), "r", False
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 4, 4, 4
    cfg.federation.rounds, cfg.train.steps, cfg.train.batch_size = 1, 1, 4
    run_in_process(cfg)  # the ServerApp's code path (run_prepared), as both entry points run it
    records = Records()
    flower = logging.getLogger("flwr")
    flower.addHandler(records)
    try:
        for lost in (ActorUnavailableError("The actor is restarting", None), ActorDiedError()):
            try:
                raise lost
            except Exception as ex:  # as Flower's simulation engine logs it (vce_api.worker)
                log(logging.ERROR, "An exception was raised when processing a message by RayBackend")
                log(logging.ERROR, ex)
        try:
            raise RuntimeError("a ClientApp that raised")
        except RuntimeError as ex:
            log(logging.ERROR, ex)
        log(logging.ERROR, "an error outside any exception")
    finally:
        flower.removeHandler(records)
    assert records.messages == ["a ClientApp that raised", "an error outside any exception"]
