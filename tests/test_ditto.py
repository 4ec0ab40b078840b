"""Ditto (strategies/ditto.py) against the plain reference, its privacy split, and lambda = 0.

The reference (tests/round_reference.py, ``ditto_train``) writes Algorithm 1 of Li et al. (2021)
out with peft's own adapter switch and the plain trainer; it shares no code with the strategy.
"""

from __future__ import annotations

import csv
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import Config, ConfigError
from fedpeft.federation.checkpoint import final_adapter
from tests.inprocess_grid import InProcessGrid, run_in_process
from tests.round_reference import run_reference

TIGHT = {"rtol": 1e-5, "atol": 1e-6}


def config(tiny_bert, tmp_path, name: str, strategy: str = "ditto", lam: float = 0.5, personal_epochs: int = 2) -> Config:
    """3 users, 2 rounds, every user every round; a personal budget (2 epochs = 4 steps) other than
    the global one (3 steps), and a lambda large enough to move v."""
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds, cfg.federation.cohort_fraction = strategy, 2, 1.0
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 3, 8, 8
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 3, 4, 0.05
    cfg.strategy.ditto_lambda, cfg.strategy.ditto_personal_epochs = lam, personal_epochs
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), name, False
    return cfg


def stored_private(run) -> dict[str, dict[str, torch.Tensor]]:
    with (run / "per_user.csv").open() as f:
        users = [r["user_id"] for r in csv.DictReader(f)]
    return {u: final_adapter(run, u) or {} for u in users}


def scores(run) -> dict[str, tuple[str, str]]:
    with (run / "per_user.csv").open() as f:
        return {r["user_id"]: (r["accuracy"], r["macro_f1"]) for r in csv.DictReader(f)}


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, **TIGHT, msg=lambda m, k=key: f"{what} {k}: {m}")


def test_ditto_equals_the_reference_for_two_rounds_on_three_users(tiny_bert, tmp_path):
    _, run = run_in_process(config(tiny_bert, tmp_path, "sim"), reply_order_seed=3)
    expected = run_reference(config(tiny_bert, tmp_path, "ref"))
    shared = load_file(run / "shared_final.safetensors")
    assert shared and all(".global." in k for k in shared)
    assert_states_close(shared, expected.shared, "shared")
    private = stored_private(run)
    assert private.keys() == expected.private.keys() and len(private) == 3
    for user, state in expected.private.items():
        assert_states_close(private[user], state, user)
    with (run / "per_user.csv").open() as f:
        rows = {r["user_id"]: r for r in csv.DictReader(f)}
    for user, metrics in expected.scores.items():
        for metric, value in metrics.items():
            assert float(rows[user][metric]) == pytest.approx(value, abs=1e-9), (user, metric)

    # the comparison can fail: another lambda, or no personal budget of its own, moves v
    for other in (config(tiny_bert, tmp_path, "l0", lam=0.0), config(tiny_bert, tmp_path, "e0", personal_epochs=0)):
        moved = run_reference(other).private
        assert any(not torch.allclose(moved[u][k], s[k], **TIGHT) for u, s in expected.private.items()
                   for k in s if ".lora_" in k)


class RecordingGrid(InProcessGrid):
    """Keeps every array key the server sends down and every one a client sends back."""

    sent_down: set[str] = set()
    sent_up: set[str] = set()

    def push_messages(self, messages: Any) -> Any:
        messages = list(messages)
        for m in messages:
            for record in m.content.array_records.values():
                RecordingGrid.sent_down |= set(record.keys())
        ids = super().push_messages(messages)
        for reply in self.waiting:
            for record in reply.content.array_records.values():
                RecordingGrid.sent_up |= set(record.keys())
        return ids


def test_a_personal_key_is_never_sent(tiny_bert, tmp_path):
    from fedpeft.learning.models import build_model

    RecordingGrid.sent_down, RecordingGrid.sent_up = set(), set()
    cfg = config(tiny_bert, tmp_path, "sent")
    run_in_process(cfg, grid_class=RecordingGrid)
    keys = set(build_model(cfg, 3, ("global",)).init_state)
    global_keys = {k for k in keys if ".lora_A.global." in k or ".lora_B.global." in k}
    personal = keys - global_keys
    assert global_keys and any("classifier" in k for k in personal) and any(".default." in k for k in personal)
    assert RecordingGrid.sent_up == global_keys  # every client sent its global adapter, and nothing else
    assert not RecordingGrid.sent_down & personal


def test_lambda_zero_is_local_only_training_from_the_same_init(tiny_bert, tmp_path):
    """With lambda = 0 and the same budget, v is local_only's adapter exactly: the same init
    (v^0), the same steps and seeds; the global adapter's training beside it changes nothing."""
    _, ditto = run_in_process(config(tiny_bert, tmp_path, "ditto0", lam=0.0, personal_epochs=0))
    _, local = run_in_process(config(tiny_bert, tmp_path, "local", strategy="local_only", personal_epochs=0))
    ditto_private, local_private = stored_private(ditto), stored_private(local)
    for user, state in local_private.items():
        assert_states_close(ditto_private[user], state, user)
    assert scores(ditto) == scores(local)
    # not vacuous: with lambda > 0 the personal adapter is another one
    _, pulled = run_in_process(config(tiny_bert, tmp_path, "ditto1", lam=1.0, personal_epochs=0))
    pulled_private = stored_private(pulled)
    assert any(not torch.allclose(pulled_private[u][k], s[k], **TIGHT) for u, s in local_private.items()
               for k in s if ".lora_" in k)


def test_ditto_refuses_packing_and_adapters_without_lora_and_takes_privacy(tiny_bert, tmp_path):
    """Packing holds one adapter per user (refused); privacy covers what ditto shares, the global
    adapter's update (allowed); the local_only refusal shows privacy_refusal can say no."""
    from fedpeft.federation.privacy_checks import privacy_refusal
    from fedpeft.learning.models import build_model
    from fedpeft.learning.packable import packing_incompatibility
    from fedpeft.strategies import make_strategy

    cfg = config(tiny_bert, tmp_path, "refuse")
    cfg.train.pack_users = 2
    assert "global" in (packing_incompatibility(cfg, "ditto", make_strategy(cfg).extra_adapters) or "")
    with pytest.raises(ConfigError, match="ditto keeps a personal LoRA adapter"):
        make_strategy(cfg).check_compatible(["base_model.model.x.ia3_l.default"])
    keys = list(build_model(cfg, 3, ("global",)).init_state)
    assert privacy_refusal(make_strategy(cfg), keys) is None
    local = config(tiny_bert, tmp_path, "refuse", strategy="local_only")
    assert privacy_refusal(make_strategy(local), keys) is not None


def test_export_names_and_holds_the_personal_adapter_only(tiny_bert, tmp_path):
    """Before: fedpeft_task.json listed merged_adapters ["default", "global"] though only the
    personal adapter is active as the user is scored, and so only it is in the export."""
    import json

    from fedpeft.export import export_user

    cfg = config(tiny_bert, tmp_path, "sim")
    cfg.federation.rounds = 1
    _, run = run_in_process(cfg)
    out = export_user(run, "user0001", tmp_path / "export")
    assert json.loads((out / "fedpeft_task.json").read_text())["merged_adapters"] == ["default"]
    exported = load_file(out / "adapter_model.safetensors")
    private = final_adapter(run, "user0001")
    shared = load_file(run / "shared_final.safetensors")
    scaling = cfg.peft.alpha / cfg.peft.r
    a_keys = [k for k in private if ".lora_A.default." in k]
    assert a_keys
    for a_key in a_keys:
        b_key = a_key.replace(".lora_A.", ".lora_B.")
        personal = scaling * private[b_key].float() @ private[a_key].float()
        got = exported[b_key.replace(".default", "")].float() @ exported[a_key.replace(".default", "")].float()
        torch.testing.assert_close(got, personal, **TIGHT)
        glob = scaling * shared[b_key.replace(".default.", ".global.")].float() @ shared[a_key.replace(".default.", ".global.")].float()
        assert not torch.allclose(got, personal + glob, **TIGHT), "the global adapter must not be in the export"
