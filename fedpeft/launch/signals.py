"""Ctrl-C and SIGTERM during a run or a study: the first signal stops the run after the round in
flight (the ServerApp checkpoints nothing more) and raises :class:`Interrupted` in the main thread;
a second one, while the run shuts down, ends the process at once."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fedpeft.federation.checkpoint import RUN_FILE, Checkpoint


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM reached the driver; raised in its main thread, where Flower's
    simulation runtime runs (the ServerApp runs in a thread of its own). ``run_dir``: the run
    folder, once the run has one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir: Path | None = None

    @property
    def exit_code(self) -> int:  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        return 128 + self.signum

    def message(self) -> str:
        if self.run_dir is None or not (self.run_dir / RUN_FILE).is_file():
            return "fedpeft: interrupted before the run started; nothing to continue"
        done = Checkpoint.saved_round(self.run_dir)
        return f"fedpeft: interrupted after round {done}; continue with `python -m fedpeft.sim --resume {self.run_dir}`"


SIGNALS = (signal.SIGINT, signal.SIGTERM)


_taking_signals = False  # inside stop_on_signals(): fedpeft's handlers are wanted


def _first_signal(signum: int, frame: Any) -> None:
    from fedpeft.federation.server_app import STOPPING

    STOPPING.set()
    for sig in SIGNALS:
        signal.signal(sig, _second_signal)
    # what Flower's threads say from now on is about the actors the shutdown ends: not the user's news
    logging.getLogger("flwr").disabled = True
    raise Interrupted(signum)


def _second_signal(signum: int, frame: Any) -> None:  # while the run shuts down: end at once
    os._exit(128 + signum)


def take_signals() -> None:
    """Make SIGINT and SIGTERM fedpeft's (again: ``ray.init`` replaces the SIGTERM handler with
    one that aborts the driver) while :func:`stop_on_signals` runs, in the main thread only."""
    if _taking_signals and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _first_signal)


@contextlib.contextmanager
def stop_on_signals():
    """While the block runs, the first SIGINT or SIGTERM raises :class:`Interrupted` in the main
    thread and tells the ServerApp's thread to checkpoint nothing more
    (:data:`fedpeft.federation.server_app.STOPPING`); a second one, while the run shuts down, ends the
    process at once."""
    global _taking_signals
    from fedpeft.federation.server_app import STOPPING

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    STOPPING.clear()
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    _taking_signals = True
    take_signals()
    try:
        yield
    finally:
        _taking_signals = False
        logging.getLogger("flwr").disabled = False
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def finish_wandb(exit_code: int) -> None:
    """Close this process's W&B run, if one is open, as ended by a signal."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        with contextlib.suppress(Exception):
            wandb.run.finish(exit_code=exit_code)
