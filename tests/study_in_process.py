"""A study script run as from the shell, with its runs on the in-process grid instead of Ray:
``python -m tests.study_in_process sims/compare.py ARGS...`` (tests that signal a study)."""

from __future__ import annotations

import runpy
import sys
from typing import Any

import fedpeft.sim
from tests.inprocess_grid import run_in_process


def run(config: Any, resume: bool = False) -> dict[str, Any]:
    """:func:`fedpeft.sim.run` on the in-process grid."""
    return run_in_process(config, resume=resume)[0]


if __name__ == "__main__":
    fedpeft.sim.run = run
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
