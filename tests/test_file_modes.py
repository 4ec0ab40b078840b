"""Run files are created with the user's umask (0666 less it), as open() would, not 0600."""

import os
import stat
from pathlib import Path

import pytest

from fedpeft.files import atomic_write_text


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: int, expected: int) -> None:
    old = os.umask(umask)
    try:
        written = atomic_write_text(tmp_path / "results.json", "{}")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives, the independent reference
    finally:
        os.umask(old)
    assert stat.S_IMODE(written.stat().st_mode) == expected == stat.S_IMODE(plain.stat().st_mode)
