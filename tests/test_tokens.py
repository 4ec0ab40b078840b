"""A call tokenises each example once (not once per batch of every epoch), and the batches it
builds from those rows are exactly what the tokenizer gives for the batch's texts together."""

from __future__ import annotations

import pytest
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec
from fedpeft.learning.inputs import model_text
from fedpeft.learning.models import build_model
from fedpeft.learning.training import train_user

TEXTS = ["short", "a somewhat longer text about a blender", "x " * 80, "mid length words here"]


def _setup(backbone: str, request) -> tuple[Config, object, list[Example], TaskSpec]:
    cfg = Config()
    cfg.model.name = str(request.getfixturevalue(backbone))
    cfg.data.max_length, cfg.model.max_new_tokens = 24, 4
    task = TaskSpec(kind="classification", labels=("yes", "no"), metrics=("accuracy",))
    loaded = build_model(cfg, len(task.labels))
    examples = [Example(id=f"e{i}", text=t, labels=("yes" if i % 2 else "no",),
                        history=("some history item",) if i == 1 else ()) for i, t in enumerate(TEXTS)]
    return cfg, loaded, examples, task


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_t5", "tiny_gpt2"])
def test_a_batch_is_what_the_tokenizer_gives_for_the_texts_together(backbone, request):
    from fedpeft.learning.inputs import CallTokens

    cfg, loaded, examples, _ = _setup(backbone, request)
    tok = loaded.tokenizer
    texts = [model_text(loaded, ex, cfg) for ex in examples]
    batch = CallTokens(loaded, cfg).batch(examples)
    if loaded.kind == "causal":  # the reference: each prompt and a newline, cut, left-padded by hand
        rows = [tok(t + "\n", add_special_tokens=False)["input_ids"][:24] for t in texts]
        width = max(map(len, rows))
        expected = {"input_ids": torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows]),
                    "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}
    else:
        extra = {} if loaded.kind == "encoder" else {"return_token_type_ids": False}
        expected = dict(tok(texts, padding=True, truncation=True, max_length=24, return_tensors="pt", **extra))
    assert sorted(batch) == sorted(expected)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert batch["input_ids"].shape[1] == 24  # the long text was cut to the budget


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_t5", "tiny_gpt2"])
def test_training_tokenises_each_example_once_per_call_whatever_the_epochs(backbone, request):
    from fedpeft.learning import inputs

    cfg, loaded, examples, task = _setup(backbone, request)
    cfg.train.batch_size, cfg.train.steps = 2, 0
    cls = type(loaded.tokenizer)
    real_call, calls = cls.__call__, []

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real_call(self, *args, **kwargs)

    def tokenizer_calls(epochs: int) -> int:
        inputs._fitted_text.cache_clear()  # fitting a text counts its tokens once, then caches it
        cfg.train.epochs = epochs
        calls.clear()
        cls.__call__ = counting
        try:
            out = train_user(loaded, examples, task, cfg, seed=1)
        finally:
            cls.__call__ = real_call
        assert out["examples"] == epochs * len(examples)
        return len(calls)

    once, thrice = tokenizer_calls(1), tokenizer_calls(3)
    assert once == thrice and once <= 6 * len(examples)


def test_per_call_shortcuts_change_nothing(tiny_bert):
    """The parameter map is looked up once per model and CPU seeding skips the accelerators'
    lazy seeding: the same parameters, the same random stream as ``torch.manual_seed``."""
    from fedpeft.learning.schedule import seed_torch

    cfg = Config()
    cfg.model.name = str(tiny_bert)
    loaded = build_model(cfg, 3)
    cached = loaded.parameters_by_name()
    fresh = dict(loaded.model.named_parameters())
    assert cached.keys() == fresh.keys() and all(cached[k] is fresh[k] for k in fresh)
    assert loaded.parameters_by_name() is cached
    torch.manual_seed(123)
    expected = torch.rand(5), torch.nn.functional.dropout(torch.ones(20), 0.5)
    seed_torch(loaded, 123)
    got = torch.rand(5), torch.nn.functional.dropout(torch.ones(20), 0.5)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
