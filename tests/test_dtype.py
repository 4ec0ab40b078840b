"""model.dtype=bfloat16: the backbone and head run in bf16 (CPU too), shared arrays travel as
float32 (Flower's ArrayRecord has no bf16) and arrive in the receiver's dtype, exactly."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message
from safetensors.torch import load_file

from fedpeft.config import Config, ConfigError
from fedpeft.federation.checkpoint import final_adapter, load_run_config
from fedpeft.federation.messages import TRAIN, make_content, make_reply, read_request
from fedpeft.learning.models import _dtype, get_model, load_adapter_state
from fedpeft.sim import main
from fedpeft.strategies import make_strategy
from fedpeft.strategies.base import Strategy, is_head
from tests.conftest import tiny_args


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built outside a running Flower app need a task identity, as run_simulation sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def bf16_config(tiny_bert: Path, strategy: str = "fedavg", optimizer: str = "fedavg") -> Config:
    cfg = Config()
    cfg.model.name, cfg.model.dtype = str(tiny_bert), "bfloat16"
    cfg.federation.strategy, cfg.federation.server_optimizer = strategy, optimizer
    return cfg


def head_state(loaded) -> dict[str, torch.Tensor]:
    """The head's keys with values that are not the init (bf16 values with full 8-bit mantissas)."""
    gen = torch.Generator().manual_seed(3)
    return {k: (torch.randn(v.shape, generator=gen) * 7.3).to(v.dtype) for k, v in loaded.init_state.items() if is_head(k)}


def incoming(content) -> Message:
    message = Message(content=content, dst_node_id=1, message_type=TRAIN)
    message.metadata.__dict__["_message_id"] = "down-1"  # as the grid sets when it pushes
    return message


@pytest.fixture
def loaded(tiny_bert):
    return get_model(bf16_config(tiny_bert), 3)


def test_bf16_backbone_on_cpu_keeps_its_head_in_bf16_and_lora_in_float32(loaded):
    assert loaded.device.type == "cpu"
    dtypes = {k: v.dtype for k, v in loaded.init_state.items()}
    assert {d for k, d in dtypes.items() if is_head(k)} == {torch.bfloat16}
    assert {d for k, d in dtypes.items() if ".lora_" in k} == {torch.float32}
    assert next(p for n, p in loaded.model.named_parameters() if "word_embeddings" in n).dtype == torch.bfloat16


def test_bf16_head_travels_down_exactly_and_arrives_in_the_models_dtype(loaded):
    head = head_state(loaded)
    request = read_request(incoming(make_content("{}", 2, head, "federated")))
    assert set(request.shared) == set(head)
    for key, value in head.items():
        assert request.shared[key].dtype == torch.float32  # the transport dtype
        assert torch.equal(request.shared[key], value.float())
    load_adapter_state(loaded, request.shared)
    params = loaded.parameters_by_name()
    for key, value in head.items():
        assert params[key].dtype == torch.bfloat16
        assert torch.equal(params[key].detach().cpu(), value)
    load_adapter_state(loaded, loaded.init_state)  # leave the cached model as it was


def test_bf16_head_travels_up_exactly(loaded):
    head = head_state(loaded)
    reply = make_reply(incoming(make_content("{}", 1)), {"num-examples": 4.0}, {"user_id": "u"}, shared=head)
    got = reply.content.array_records["shared"].to_torch_state_dict()
    assert set(got) == set(head)
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k].to(torch.bfloat16), v) for k, v in head.items())


def upload(state: dict[str, torch.Tensor], n: int) -> Message:
    return make_reply(incoming(make_content("{}", 1)), {"num-examples": float(n)}, {}, shared=state)


@pytest.mark.parametrize("optimizer", ["fedavg", "fedadam"])
def test_server_aggregates_bf16_shared_state_back_into_bf16(tiny_bert, optimizer):
    gen = torch.Generator().manual_seed(0)
    shared = {"classifier.weight": torch.zeros(3, 4, dtype=torch.bfloat16), "lora_A": torch.zeros(2, 4)}
    clients = [{k: torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in shared.items()} for _ in range(2)]
    out = Strategy(bf16_config(tiny_bert, optimizer=optimizer)).aggregate(1, shared, [upload(c, n) for c, n in zip(clients, (1, 3))])
    assert {k: v.dtype for k, v in out.items()} == {k: v.dtype for k, v in shared.items()}
    if optimizer == "fedavg":
        mean = (clients[0]["classifier.weight"].double() + 3 * clients[1]["classifier.weight"].double()) / 4
        assert torch.equal(out["classifier.weight"], mean.to(torch.bfloat16))
    assert all(torch.isfinite(v.float()).all() for v in out.values())


def test_float16_on_cpu_clients_is_refused_naming_the_allowed_dtypes(tiny_bert):
    cfg = bf16_config(tiny_bert)
    cfg.model.dtype = "float16"
    with pytest.raises(ConfigError) as err:
        _dtype(cfg)
    assert all(word in str(err.value) for word in ("model.dtype=float16", "float32", "bfloat16", "ray.client_gpus"))
    cfg.model.dtype = "bfloat16"
    assert _dtype(cfg) == torch.bfloat16


def test_float16_encoder_is_refused_on_gpu_clients_too(tiny_bert):
    """An encoder's float16 head turns NaN at the first AdamW step (seen on an H100 as on the CPU)."""
    from fedpeft.learning.models import build_model

    cfg = bf16_config(tiny_bert)
    cfg.model.dtype, cfg.ray.client_gpus = "float16", 1.0
    with pytest.raises(ConfigError, match="bfloat16"):
        build_model(cfg, 3)


def test_float16_on_cpu_is_refused_by_the_entry_point_before_anything_runs(tiny_bert, tmp_path, capsys):
    assert main(tiny_args(tiny_bert, tmp_path, "f16", "--dtype", "float16")) == 2
    assert "model.dtype=float16" in capsys.readouterr().err
    assert not (tmp_path / "f16").exists()


# ---- end to end: the real entry point on Ray ------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_runs(tiny_bert, tmp_path_factory) -> Path:
    """fedavg and fedsa in bfloat16 on Ray, as one comparison: one Ray session for both
    (fedpeft.launch.ray_start.SharedRay); each run's folder is ``<study>/<strategy>``."""
    from fedpeft.study.compare import main as compare_main

    out = tmp_path_factory.mktemp("bf16")
    args = tiny_args(tiny_bert, out, "unused", "--dtype", "bfloat16")
    del args[2:6]  # without --out and --name: the comparison names its runs
    assert compare_main(["--strategies", "fedavg,fedsa", "--compare-out", str(out / "study"), *args]) == 0
    return out / "study"


def _assert_every_user_trained_and_scored(run: Path) -> None:
    results = json.loads((run / "results.json").read_text())
    assert results["summary"]["n_failed"] == 0 and results["summary"]["n_evaluated"] == 6, results["failed_users"]
    assert results["failed_calls"] == 0
    with (run / "per_user.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and all(r["status"] == "ok" and r["rounds_trained"] == "2" for r in rows), rows
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["trained"] == 6 and r["failed"] == 0 and np.isfinite(r["train_loss"]) for r in rounds)


@pytest.mark.slow
def test_fedavg_bf16_shares_the_bf16_head_on_ray(bf16_runs, tiny_bert):
    run = bf16_runs / "fedavg"
    _assert_every_user_trained_and_scored(run)
    final = load_file(str(run / "shared_final.safetensors"))  # the server's state after 2 aggregations
    assert {v.dtype for k, v in final.items() if is_head(k)} == {torch.bfloat16}
    assert {v.dtype for k, v in final.items() if ".lora_" in k} == {torch.float32}
    init = get_model(bf16_config(tiny_bert), 3).init_state
    assert any(not torch.equal(final[k], init[k]) for k in final if is_head(k)), "the shared head never moved"


@pytest.mark.slow
def test_fedsa_bf16_keeps_a_bf16_head_private_on_ray(bf16_runs):
    run = bf16_runs / "fedsa"
    _assert_every_user_trained_and_scored(run)
    config = load_run_config(run)
    strategy = make_strategy(config)
    for i in range(6):  # what each client's model held after training: its private part, saved as is
        private = final_adapter(run, f"user{i:04d}")
        assert private and not any(strategy.is_shared(k, "federated") for k in private)
        assert {v.dtype for k, v in private.items() if is_head(k)} == {torch.bfloat16}
        assert {v.dtype for k, v in private.items() if ".lora_" in k} == {torch.float32}
