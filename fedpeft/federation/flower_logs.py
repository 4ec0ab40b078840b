"""Flower's log records about a lost Ray worker, dropped: fedpeft reports that loss itself.

A worker that ``federation.call_timeout`` ends, one that dies mid-call, and one that Ray is
restarting make Flower's simulation engine log, for every call that reached it, three ERROR
records with a Ray traceback (``ActorUnavailableError`` / ``ActorDiedError``), even when the run
goes on and succeeds. fedpeft handles each of those calls: it sends a call that reached a
restarting worker again, and records any other as that user's failure for the round
(failures.json, per_user.csv, the counts and the run's verdict in results.json, the summary's
closing lines). :class:`LostWorkerFilter` drops exactly the records Flower logs while handling
such an exception; every other record, every other error's traceback included, passes.
"""

from __future__ import annotations

import logging
import sys

FLOWER_LOGGER = "flwr"


def lost_worker(error: BaseException | None) -> bool:
    """Whether ``error`` is Ray's word for a lost actor (died, or restarting)."""
    if error is None:
        return False
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError

    return isinstance(error, RayActorError)


class LostWorkerFilter(logging.Filter):
    """Drops a record logged while a lost actor's exception is being handled (Flower logs them
    inside its ``except`` blocks: the exception in flight is the record's subject)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not lost_worker(error)


def quiet_lost_workers() -> None:
    """Put :class:`LostWorkerFilter` on Flower's logger (once per process)."""
    logger = logging.getLogger(FLOWER_LOGGER)
    if not any(isinstance(f, LostWorkerFilter) for f in logger.filters):
        logger.addFilter(LostWorkerFilter())
