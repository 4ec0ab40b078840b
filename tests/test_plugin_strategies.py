"""Strategies of one's own: the README's example, loaded as ``module:Class`` and through the
entry-point group ``fedpeft.strategies`` of an installed package, checked and run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedpeft.config import ConfigError
from fedpeft.sim import main
from fedpeft.strategies import (
    ENTRY_POINT_GROUP,
    STRATEGIES,
    get_strategy_class,
    installed_strategies,
)
from fedpeft.strategies.base import Strategy
from tests.conftest import tiny_args
from tests.test_run_outputs import tiny_config

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The README's example strategy module (its first ```python block that starts `# my_strategies.py`)."""
    blocks = re.findall(r"```python\n(# my_strategies\.py.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no example strategy"
    return blocks[0]


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    """The README's example as an installed package: the module and a dist-info whose
    entry_points.txt declares it in the group fedpeft.strategies, on the path of the driver
    and (through PYTHONPATH) of every Ray worker."""
    site = tmp_path / "site"
    (site / "my_strategies-0.1.dist-info").mkdir(parents=True)
    (site / "my_strategies.py").write_text(readme_example())
    (site / "my_strategies-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: my-strategies\nVersion: 0.1\n")
    (site / "my_strategies-0.1.dist-info" / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nshared_b_head = my_strategies:SharedBHead\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", f"{site}:{__import__('os').environ.get('PYTHONPATH', '')}")
    installed_strategies.cache_clear()
    yield site
    installed_strategies.cache_clear()


def test_module_class_and_entry_point_load_the_same_checked_class(user_package):
    by_path = get_strategy_class("my_strategies:SharedBHead")
    assert by_path is get_strategy_class("shared_b_head") and issubclass(by_path, Strategy)
    assert "shared_b_head" not in STRATEGIES  # loaded, not registered: nothing built in changed
    with pytest.raises(ConfigError, match="Known strategies: .*shared_b_head"):
        get_strategy_class("no_such_strategy")


@pytest.mark.parametrize("spec, needle", [
    ("my_strategies:Nope", "has no 'Nope'"),
    ("no_such_module_xyz:Thing", "cannot be imported"),
    ("my_strategies:is_lora_b", "not a subclass of fedpeft.strategies.Strategy"),
    ("my_strategies:Strategy", "the base class Strategy itself"),
])
def test_a_bad_plug_in_is_refused_with_what_is_wrong(user_package, spec, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        get_strategy_class(spec)


def test_a_plug_in_strategy_runs_the_real_client_and_server_code(user_package, tiny_bert, tmp_path):
    """module:Class through the real ServerApp/ClientApp code on an in-process grid (no Ray):
    only LoRA B and the head leave the clients."""
    from tests.inprocess_grid import run_in_process

    cfg = tiny_config(tiny_bert, tmp_path, "by-path", "my_strategies:SharedBHead")
    results, run = run_in_process(cfg)
    assert results["summary"]["n_failed"] == 0 and results["communication"]["bytes_up"] > 0
    from safetensors.torch import load_file

    shared = load_file(run / "shared_final.safetensors")
    assert shared and all(".lora_B." in k or "classifier" in k for k in shared), sorted(shared)


@pytest.mark.slow
def test_an_installed_entry_point_strategy_runs_through_the_entry_point(user_package, tiny_bert, tmp_path, ray_shutdown):
    """`--strategy shared_b_head` from an installed package's entry point, on Ray: every worker
    finds it the same way the driver does."""
    assert main(tiny_args(tiny_bert, tmp_path, "ep", "--strategy", "shared_b_head", "data.num_users=3")) == 0
    results = json.loads((tmp_path / "ep" / "results.json").read_text())
    assert results["strategy"] == "shared_b_head"
    assert results["summary"]["n_evaluated"] == 3 and results["summary"]["n_failed"] == 0
    assert 0 < results["parameters"]["shared_params"] < results["parameters"]["trainable_params_per_user"]
