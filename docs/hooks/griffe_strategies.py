"""Griffe extensions for the API pages: ``fedpeft.strategies`` where the code puts it, and
Sphinx-style cross-references shown as code.

The strategies live in the repository's top-level ``strategies/`` folder and install as
``fedpeft.strategies`` (``package-dir`` in pyproject.toml), so a static reading of ``fedpeft/``
does not find them. When griffe has read the ``fedpeft`` package, this extension reads the folder
Python imports ``fedpeft.strategies`` from and attaches it, with its modules, under that name.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import griffe

PACKAGE = "fedpeft"
SUBPACKAGE = "strategies"


class StrategiesPackage(griffe.Extension):
    def on_module_members(self, *, mod: griffe.Module, agent: Any, **kwargs: Any) -> None:
        if mod.path != PACKAGE or SUBPACKAGE in mod.members:
            return
        spec = importlib.util.find_spec(f"{PACKAGE}.{SUBPACKAGE}")
        if spec is None or not spec.submodule_search_locations:
            return
        folder = Path(next(iter(spec.submodule_search_locations)))
        common = {"extensions": agent.extensions, "docstring_parser": agent.docstring_parser, "docstring_options": agent.docstring_options,
                  "lines_collection": agent.lines_collection, "modules_collection": agent.modules_collection}
        init = folder / "__init__.py"
        package = griffe.visit(SUBPACKAGE, init, init.read_text(), parent=mod, **common)
        mod.set_member(SUBPACKAGE, package)
        for path in sorted(folder.glob("*.py")):
            if path.name != "__init__.py":
                package.set_member(path.stem, griffe.visit(path.stem, path, path.read_text(), parent=package, **common))


ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|exc|obj):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    """Docstrings cite objects Sphinx-style (:func:`fedpeft.sim.run`); the pages show them as code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda m: f"`{m.group(1)}`", obj.docstring.value)
