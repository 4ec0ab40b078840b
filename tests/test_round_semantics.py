"""One client call's budget, FedProx anchor and accounting, on the real client code in process."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import Config
from fedpeft.federation.client_app import run_train
from fedpeft.federation.messages import Request
from fedpeft.federation.store import AdapterStore
from fedpeft.launch.prepare import prepare_adapter
from fedpeft.learning.models import get_model
from tests.test_strategies import flower_task_identity, initial_shared  # noqa: F401  (an autouse fixture)
from tests.test_strategies import tiny_config as strategy_config


def tiny_config(tiny_bert, tmp_path, strategy: str, **train) -> Config:
    cfg = strategy_config(tiny_bert, tmp_path, strategy)
    cfg.data.num_users, cfg.train.lr, cfg.train.steps = 4, 0.05, 0
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


# ---- train.steps replaces train.epochs only; a strategy's epoch budget stays epochs -------------

def test_fedrep_head_epochs_stay_epochs_when_train_steps_is_set(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, "fedrep", steps=3)
    cfg.strategy.fedrep_head_epochs = 2
    _, stats, _ = run_train(Request(cfg, 1, "federated", initial_shared(cfg)), 0)
    # 8 examples in batches of 4: 2 head epochs = 4 steps; the body takes train.steps = 3
    assert stats["steps"] == 4 + 3
    assert stats["examples_processed"] == 2 * 8 + 3 * 4


def test_fedavg_ft_finetune_epochs_stay_epochs_when_train_steps_is_set(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, "fedavg_ft", steps=3)
    cfg.strategy.finetune_epochs = 3
    shared = initial_shared(cfg)
    _, federated, _ = run_train(Request(cfg, 1, "federated", shared), 0)
    _, finetune, _ = run_train(Request(cfg, 2, "finetune", shared), 0)
    assert federated["steps"] == 3  # train.steps
    assert finetune["steps"] == 3 * 2 and finetune["examples_processed"] == 3 * 8  # 3 epochs of 2 batches


def test_pooled_oppu_task_epochs_stay_epochs_when_train_steps_is_set(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, "oppu", steps=3)
    cfg.strategy.oppu_task_mode, cfg.strategy.oppu_task_rounds = "pooled", 2
    _, accounting = prepare_adapter(cfg)
    # pooled: 2 epochs over the union of 4 users x 8 examples
    assert accounting["pretrain_examples"] == 2 * 4 * 8


# ---- FedProx anchors only the keys shared in the current phase ----------------------------------

def _private_after(cfg: Config, server_round: int, phase: str, shared, optimizer: str, mu: float) -> dict[str, torch.Tensor]:
    cfg.federation.server_optimizer, cfg.federation.proximal_mu = optimizer, mu
    cfg.output.store_dir = f"{cfg.output.store_dir}-{optimizer}"  # each call starts from no private state
    run_train(Request(cfg, server_round, phase, shared), 0)
    return AdapterStore(cfg.output.store_dir).latest("user0000")[1]


@pytest.mark.parametrize("strategy, phase", [("fedavg_ft", "finetune"), ("oppu", "personal")])
def test_fedprox_leaves_keys_private_in_this_phase_alone(strategy, phase, tiny_bert, tmp_path):
    """Before: fedavg_ft's fine-tuned copy was pulled back to the global adapter, oppu's personal head
    towards the task head. Keys private in a phase train exactly as without FedProx."""
    cfg = tiny_config(tiny_bert, tmp_path, strategy, steps=4)
    shared = initial_shared(cfg)
    shared = {k: v + 0.5 for k, v in shared.items()}  # a global state away from the init: an anchor that would pull
    plain = _private_after(cfg, 2, phase, shared, "fedavg", 0.0)
    prox = _private_after(cfg, 2, phase, shared, "fedprox", 100.0)
    assert plain and plain.keys() == prox.keys()
    for key in plain:
        torch.testing.assert_close(prox[key], plain[key], rtol=0, atol=0)


def test_fedprox_does_pull_shared_keys(tiny_bert, tmp_path):
    """The same comparison in a phase that shares the keys: FedProx changes the result (the test above can fail)."""
    cfg = tiny_config(tiny_bert, tmp_path, "fedavg", steps=4)
    shared = {k: v + 0.5 for k, v in initial_shared(cfg).items()}
    sent = {}
    for optimizer, mu in (("fedavg", 0.0), ("fedprox", 100.0)):
        cfg.federation.server_optimizer, cfg.federation.proximal_mu = optimizer, mu
        sent[optimizer], _, _ = run_train(Request(cfg, 1, "federated", shared), 0)
    distance = {name: sum(float(((s[k] - shared[k]) ** 2).sum()) for k in s) for name, s in sent.items()}
    assert distance["fedprox"] < distance["fedavg"]


# ---- accounting: private = trained in some phase that does not send it --------------------------

def test_oppu_private_params_are_the_personal_adapter_and_head(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, "oppu")
    _, accounting = prepare_adapter(cfg)
    model = get_model(cfg, 3, ("personal",)).model
    personal = sum(p.numel() for n, p in model.named_parameters() if ".personal." in n and "lora_" in n)
    head = sum(p.numel() for n, p in model.named_parameters() if "classifier.modules_to_save.default." in n)
    task_lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and ".default." in n)
    assert personal > 0 and head > 0 and task_lora > 0
    assert accounting["private_params"] == personal + head  # not the frozen task adapter
    assert accounting["shared_params"] == task_lora + head
