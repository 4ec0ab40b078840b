"""The README's claims about options hold: its options table matches the config schema."""

from __future__ import annotations

import re
from pathlib import Path

from fedpeft.config import FLAG_ALIASES, iter_fields

README = Path(__file__).resolve().parents[1] / "README.md"


def options_table() -> list[tuple[str, str, str]]:
    """(flags, keys, defaults) cells of the README's "Main options" table."""
    text = README.read_text().split("## Main options", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("| `--")]
    return [tuple(cell.strip() for cell in row.strip("|").split("|")[:3]) for row in rows]


def test_options_table_defaults_match_the_schema():
    defaults = {key: default for key, _, default, _ in iter_fields()}
    checked = 0
    for _flags, keys, written in options_table():
        key_list = re.findall(r"`([^`]+)`", keys)
        if not key_list:  # --config: files, no key
            continue
        values = [v.strip().strip("`") for v in written.split(",")]
        assert len(values) == len(key_list), (keys, written)
        for key, value in zip(key_list, values, strict=True):
            assert key in defaults, f"README names unknown key {key}"
            expected = "auto" if defaults[key] == "" else str(defaults[key])
            assert value == expected, f"README says {key} defaults to {value!r}; the schema says {defaults[key]!r}"
            checked += 1
    assert checked >= len(FLAG_ALIASES)


def test_every_flag_is_in_the_options_table():
    flags = " ".join(f for f, _, _ in options_table())
    for flag, key in FLAG_ALIASES.items():
        assert f"`--{flag}`" in flags, f"--{flag} ({key}) is missing from the README's options table"
