"""strategies/ installs as fedpeft.strategies: no top-level `strategies` package in a user's
environment, from the wheel or from the editable install CI uses."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_fedpeft_strategies_and_no_top_level_strategies(tmp_path):
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "fedpeft", "strategies", "configs"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(src)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("fedpeft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fedpeft/strategies/__init__.py" in names and "fedpeft/strategies/fedsa.py" in names
    assert not [n for n in names if n.startswith("strategies/")]
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["fedpeft"]
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()  # what Flower's `flwr run .` looks for
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_the_citation_file_names_the_version_and_the_license_of_the_package():
    import tomllib
    import yaml

    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert citation["cff-version"] == "1.2.0" and citation["title"] and citation["authors"]
    assert str(citation["version"]) == project["version"] and citation["license"] == project["license"] == "Apache-2.0"
    assert "Apache License" in (REPO / "LICENSE").read_text().splitlines()[0]


def test_outside_the_repo_strategies_is_not_importable_and_fedpeft_strategies_is(tmp_path):
    code = ("import importlib.util, fedpeft.strategies as s; "
            "print(importlib.util.find_spec('strategies') is None, sorted(s.STRATEGIES)[:2])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}).stdout
    assert out.strip() == "True ['ditto', 'fedavg']"
