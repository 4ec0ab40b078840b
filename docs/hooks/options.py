"""MkDocs hook: the options reference (options.md), written at build time from the config schema.

Every key of the schema (``fedpeft.config_checks.iter_fields``: key, type, default, help with its
range), the words a key takes (``CHOICES``), the flags that stand for keys (``FLAG_ALIASES``) and
the options of ``python -m fedpeft.sim`` that are no key (its parser, ``fedpeft.cli``) go into one
generated page, so the reference cannot drift from the code. ``tests/test_readme.py`` builds the
page with :func:`options_markdown` and holds it to the schema.
"""

from __future__ import annotations

import argparse
from typing import Any

PAGE = "options.md"  # the generated page, relative to docs/
ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "&#124;", "\\": "\\\\", "`": "\\`", "*": "\\*",
           "_": "\\_", "[": "\\[", "]": "\\]"}

INTRO = """\
# Options reference

Every key of fedpeft's config, with its default and what it does. This page is generated from
the config schema when the site is built (`docs/hooks/options.py`), so it always matches the
code; `python -m fedpeft.sim --help` prints the same.

A key can be set in any of these ways, later layers on top of earlier ones:

1. the schema's defaults (below; `configs/default.yaml` holds the same values, a test keeps them equal);
2. YAML files: `--config FILE` (repeat it to layer several; the layout of `configs/default.yaml`);
3. the command line: `KEY=VALUE` or `--KEY=VALUE` (e.g. `train.lr=1e-3`, `--federation.cohort_fraction=0.5`),
   or a flag of the table below (`--strategy fedsa`).

The same keys are `overrides={...}` of `fedpeft.run`, the parameters of a W&B sweep, arguments
of the study scripts (`sims/compare.py`, `sims/where_sharing_pays.py`, `sims/privacy.py`) and the
run config of `flwr run .`. Lists are comma lists (`peft.target_modules=query,value`). Unknown keys and bad values stop the run before Ray
starts and name the closest valid key.
"""


def escape(text: str) -> str:
    """Help text as table-cell Markdown: no HTML, no emphasis, no cell breaks."""
    return "".join(ESCAPES.get(ch, ch) for ch in text)


def default_text(value: Any) -> str:
    """A default as it is written on the command line (``KEY=VALUE``); empty values read *empty*."""
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        value = ",".join(str(item) for item in value)
    text = str(value)
    return f"`{text}`" if text else "*empty*"


def parse_default(cell: str) -> str:
    """The inverse of :func:`default_text`: the ``VALUE`` a default cell stands for."""
    return "" if cell == "*empty*" else cell.strip("`")


def non_key_options(parser: argparse.ArgumentParser, keys: set[str]) -> list[tuple[str, str, str]]:
    """(flags, metavar, help) of the parser's options that stand for no config key."""
    rows = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if action.dest in keys or isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        rows.append((", ".join(action.option_strings), action.metavar or "", action.help or ""))
    return rows


def options_markdown() -> str:
    """The whole options page."""
    from fedpeft.cli import build_parser
    from fedpeft.config import FLAG_ALIASES
    from fedpeft.config_checks import CHOICES, iter_fields

    fields = list(iter_fields())
    keys = {key for key, *_ in fields}
    flag_of = {key: flag for flag, key in FLAG_ALIASES.items()}
    lines = [INTRO, "## Flags of `python -m fedpeft.sim`", "",
             "Each flag stands for a key; every key is also a flag of its own name (`--train.lr=1e-3`).", "",
             "| flag | key | default |", "|---|---|---|"]
    defaults = {key: default for key, _, default, _ in fields}
    for flag, key in FLAG_ALIASES.items():
        lines.append(f"| `--{flag}` | [`{key}`](#{anchor(key)}) | {default_text(defaults[key])} |")
    lines += ["", "Options that are no config key:", "", "| option | value | meaning |", "|---|---|---|"]
    for flags, metavar, help_ in non_key_options(build_parser(), keys):
        flags_md = ", ".join(f"`{flag}`" for flag in flags.split(", "))
        lines.append(f"| {flags_md} | {f'`{metavar}`' if metavar else ''} | {escape(help_)} |")
    section = None
    for key, _, default, help_ in fields:
        group = key.split(".")[0] if "." in key else ""
        if group != section:
            section = group
            title = f"`{group}.*`" if group else "Top level"
            lines += ["", f"## {title}", "", "| key | default | flag | values | meaning |", "|---|---|---|---|---|"]
        flag = f"`--{flag_of[key]}`" if key in flag_of else ""
        values = ", ".join(f"`{word}`" for word in CHOICES.get(key, ()))
        lines.append(f"| <a id=\"{anchor(key)}\"></a>`{key}` | {default_text(default)} | {flag} | {values} | {escape(help_)} |")
    return "\n".join(lines) + "\n"


def anchor(key: str) -> str:
    return "key-" + key.replace(".", "-").replace("_", "-")


def on_files(files: Any, config: Any) -> Any:
    """MkDocs event: add the generated page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=options_markdown()))
    return files
