"""The packed trainer (issue 20) against the per-user path, on tiny random models, dropout off.

The reference is the per-user path the client runs: ``compose_user_model`` (here
``load_adapter_state`` of the same composed state), then the strategy's ``local_train`` over
``train_user``, then ``adapter_state``; and ``training.predict``. Three users of 5, 9 and 13
training examples at batch 4 take 4, 6 and 8 steps per epoch budget, so the packed batch has
equal groups in some steps, unequal ones (short last batches) in others, and users masked
while others still step.

Tolerance: float32 sums reassociate when the same products are computed by ``torch.bmm`` over
stacked users instead of one ``nn.Linear`` per user, and when a batch is padded to a longer row
(attention softmax over more, masked, positions); that is ~1e-7 relative per operation. AdamW
divides each update by sqrt(v), so a gradient's tiny relative change can move a weight by a
small fraction of lr: after 8 steps at lr 5e-3 the measured worst differences are 1e-7 to
3e-6 (they are printed: ``pytest -s``). We assert atol 2e-5 + rtol 1e-4 on weights, rtol 1e-5 on losses,
exact step and example counts, and equal predictions.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec, get_benchmark
from fedpeft.learning import models
from fedpeft.learning.packable import PACKABLE_STRATEGIES, packing_incompatibility
from fedpeft.learning.packing import predict_packed, train_packed, train_strategy_packed
from fedpeft.learning.training import TrainingDiverged, batch_listener, predict, train_user
from fedpeft.strategies import make_strategy

SIZES = (5, 9, 13)
SEEDS = (11, 12, 13)
ATOL, RTOL = 2e-5, 1e-4
MEASURED: dict[str, float] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these models are tiny, and threads only contend on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(path: Path, strategy: str, **train) -> Config:
    config = Config()
    config.model.name, config.model.max_new_tokens = str(path), 4
    config.federation.strategy = strategy
    config.strategy.fedper_layers = 1
    config.train.batch_size, config.train.epochs, config.train.lr, config.train.eval_batch_size = 4, 2, 5e-3, 4
    for key, value in train.items():
        setattr(config.train, key, value)
    assert config.peft.dropout == 0.0
    return config


def _users(config: Config, task_kind: str = "classification"):
    bench = get_benchmark(config)
    users = [bench.load_user(i) for i in range(len(SIZES))]
    task = bench.task()
    if task_kind == "multilabel":  # the same texts, each with one or two of the labels
        task = TaskSpec(kind="multilabel", labels=task.labels)

        def relabel(examples: list[Example]) -> list[Example]:
            return [Example(ex.id, ex.text, tuple(task.labels[j % len(task.labels)] for j in range(i % 2 + 1)))
                    for i, ex in enumerate(examples)]
        users = [type(u)(u.user_id, relabel(u.train), relabel(u.val), relabel(u.test)) for u in users]
    return users, task


def _states(loaded: models.LoadedModel, strategy, phase: str, head_scale: float = 2.0) -> tuple[dict, list[dict]]:
    """A shared part (the strategy's shared keys) and three private parts, all off the init."""
    g = torch.Generator().manual_seed(1)

    def noisy(keys):  # heads far apart, so that users' predictions differ
        return {k: loaded.init_state[k] + (head_scale if ".classifier." in k else 0.05)
                * torch.randn(loaded.init_state[k].shape, generator=g) for k in keys}
    shared_keys = [k for k in loaded.init_state if strategy.is_shared(k, phase)]
    private_keys = [k for k in loaded.init_state if not strategy.is_shared(k, phase) and not strategy.is_frozen(k, phase)]
    return noisy(shared_keys), [noisy(private_keys) for _ in SIZES]


def _close(name: str, ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert set(ref) == set(got)
    worst = max((ref[k].double() - got[k].double()).abs().max().item() for k in ref)
    MEASURED[name] = max(MEASURED.get(name, 0.0), worst)
    for key in ref:
        assert ref[key].dtype == got[key].dtype
        torch.testing.assert_close(got[key], ref[key], atol=ATOL, rtol=RTOL, msg=lambda m, k=key: f"{name} {k}: {m}")


CASES = [  # (backbone, strategy, fedprox mu, weight decay, task kind)
    ("encoder", "local_only", 0.0, 0.01, "classification"),
    ("encoder", "fedrep", 0.0, 0.0, "classification"),  # head epochs, then body: two packed passes
    ("encoder", "fedsa", 0.5, 0.0, "classification"),  # fedprox anchors on the shared LoRA A
    ("encoder", "fedavg", 0.0, 0.0, "multilabel"),
    ("seq2seq", "ffa", 0.0, 0.01, "classification"),  # A frozen: trainable is a key subset
    ("seq2seq", "fedavg", 0.5, 0.0, "classification"),
    ("causal", "local_only", 0.0, 0.0, "classification"),
    ("causal", "fedper", 0.5, 0.01, "classification"),
]


@pytest.mark.parametrize(("kind", "strategy_name", "mu", "weight_decay", "task_kind"), CASES)
def test_packed_equals_per_user(no_dropout_models, kind, strategy_name, mu, weight_decay, task_kind):
    config = _config(no_dropout_models[kind], strategy_name, weight_decay=weight_decay)
    users, task = _users(config, task_kind)
    loaded = models.build_model(config, len(task.labels))
    assert loaded.kind == kind
    strategy = make_strategy(config)
    phase = strategy.phases()[0]
    shared, privates = _states(loaded, strategy, phase.name)
    states = [models.composed_state(loaded, shared, p) for p in privates]
    trains = [u.train[:n] for u, n in zip(users, SIZES)]
    anchor = {k: v for k, v in shared.items() if strategy.is_shared(k, phase.name)} if mu > 0 else None

    reference = []
    for u, user in enumerate(users):
        models.compose_user_model(loaded, shared, privates[u])

        def train(trainable=lambda key: True, epochs=None, u=u):
            return train_user(loaded, trains[u], task, config, SEEDS[u], trainable=trainable, epochs=epochs,
                              anchor=anchor, mu=mu)
        stats = strategy.local_train(train, phase)
        reference.append((models.adapter_state(loaded), stats, predict(loaded, user.test + user.val, task, config)))

    before = models.adapter_state(loaded)
    outcomes = train_strategy_packed(lambda t: strategy.local_train(t, phase), loaded, states, trains, task, config,
                                     list(SEEDS), anchors=anchor, mu=mu)
    assert all("forward" not in vars(m) for m in loaded.model.modules())  # the model is restored
    for key, value in models.adapter_state(loaded).items():  # and its own adapter untouched
        assert torch.equal(value, before[key])
    preds = predict_packed(loaded, [o.state for o in outcomes], [u.test + u.val for u in users], task, config)

    for u, (state, stats, ref_preds) in enumerate(reference):
        out = outcomes[u]
        assert out.error is None
        _close(f"{kind}/{strategy_name}", state, out.state)
        assert set(out.result) == set(stats)
        for key, value in stats.items():
            assert out.result[key] == pytest.approx(value, rel=1e-5), key
        assert out.result["steps"] == stats["steps"]
        assert preds[u] == ref_preds
    assert [o.result["steps"] for o in outcomes] != [outcomes[0].result["steps"]] * 3  # some users were masked
    print(f"\n{kind}/{strategy_name} mu={mu}: max |packed - per-user| = {MEASURED[f'{kind}/{strategy_name}']:.2e}")


@pytest.mark.parametrize("kind", ["encoder", "seq2seq", "causal"])
def test_packed_forward_equals_each_users_forward(no_dropout_models, kind):
    """The packed layers themselves: each row's logits equal its user's own forward pass, with
    equal and unequal groups (3 users' batches of 4, 4, 4 rows, then 3, 1, 2), each batch padded
    to its own longest row per user and to the packed batch's longest when packed."""
    from fedpeft.learning.inputs import CallTokens, text_to_text_batch
    from fedpeft.learning.packed_lora import PackedModel as _PackedModel

    config = _config(no_dropout_models[kind], "local_only")
    users, task = _users(config)
    loaded = models.build_model(config, len(task.labels))
    _, privates = _states(loaded, make_strategy(config), "federated")
    states = [models.composed_state(loaded, {}, p) for p in privates]
    tokens = CallTokens(loaded, config)

    def forward(examples):  # logits at the positions a loss or a prediction reads
        if kind == "encoder":
            return [loaded.model(**tokens.batch(examples)).logits]
        batch = text_to_text_batch(loaded, examples, task, config, tokens)
        labels = batch.pop("labels")
        if kind == "seq2seq":
            decoder = loaded.model.get_base_model().prepare_decoder_input_ids_from_labels(labels=labels)
            logits = loaded.model(**batch, decoder_input_ids=decoder).logits
            return [row[lab != -100] for row, lab in zip(logits, labels)]
        logits = loaded.model(**batch).logits
        return [row[mask.bool()] for row, mask in zip(logits, batch["attention_mask"])]

    pack = _PackedModel.of(loaded)
    values = [pack.user_values(state, None) for state in states]
    for sizes in ((4, 4, 4), (3, 1, 2)):
        chunks = [user.test[:n] for user, n in zip(users, sizes)]
        with torch.no_grad():
            reference = []
            for state, chunk in zip(states, chunks):
                models.load_adapter_state(loaded, state)
                reference.append(forward(chunk))
            with pack.installed() as rows:
                rows.set(values, list(sizes))
                packed = forward([ex for chunk in chunks for ex in chunk])
        if kind == "encoder":  # one [rows, labels] tensor per call
            packed = list(torch.split(packed[0], list(sizes)))
            reference = [ref[0] for ref in reference]
        else:
            packed = [packed[sum(sizes[:u]):sum(sizes[:u + 1])] for u in range(len(sizes))]
        for ref, got in zip(reference, packed):
            for r, g in zip(ref, got):
                MEASURED[f"{kind}/logits"] = max(MEASURED.get(f"{kind}/logits", 0.0), (r - g).abs().max().item())
                torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
    print(f"\n{kind}: max |packed - per-user| logits = {MEASURED[f'{kind}/logits']:.2e}")


@pytest.mark.parametrize("kind", ["encoder", "causal"])
def test_packed_bfloat16_backbone(no_dropout_models, kind):
    """A bfloat16 backbone (as on a GPU): bf16 base outputs plus float32 LoRA deltas, cast back
    as peft casts them. bf16 keeps 8 bits of mantissa, so sums reassociated by the batched
    matmuls differ by about one bf16 ulp (2**-8 relative); the encoder's head is bf16 itself.
    AdamW turns a near-zero gradient's bf16 noise into a step of up to lr either way, so single
    weights can differ by a few lr: asserted instead, per key, that the training updates
    (trained - start) agree to 5% in norm, and the losses to 2**-6."""
    config = _config(no_dropout_models[kind], "local_only")
    config.model.dtype = "bfloat16"
    users, task = _users(config)
    loaded = models.build_model(config, len(task.labels))
    # a head of small weights: a bf16 head of weights ~2 rounds away updates of this size
    _, privates = _states(loaded, make_strategy(config), "federated", head_scale=0.05)
    states = [models.composed_state(loaded, {}, p) for p in privates]
    trains = [u.train[:n] for u, n in zip(users, SIZES)]
    outcomes = train_packed(loaded, states, trains, task, config, list(SEEDS))
    for u, state in enumerate(states):
        models.load_adapter_state(loaded, state)
        result = train_user(loaded, trains[u], task, config, SEEDS[u])
        reference = models.adapter_state(loaded)
        for key, value in reference.items():
            start = state[key].to(value.dtype).double()
            update, packed_update = value.double() - start, outcomes[u].state[key].double() - start
            error = ((packed_update - update).norm() / update.norm().clamp_min(1e-12)).item()
            MEASURED[f"{kind}/bf16"] = max(MEASURED.get(f"{kind}/bf16", 0.0), error)
            assert error < 0.05, (key, error)
        assert outcomes[u].result["steps"] == result["steps"]
        assert outcomes[u].result["train_loss"] == pytest.approx(result["train_loss"], rel=2**-6)
    print(f"\n{kind} bf16: max relative update difference = {MEASURED[f'{kind}/bf16']:.2e}")


def test_a_failing_user_fails_alone(no_dropout_models):
    """A user whose loss is NaN (its head is) diverges as train_user says; an unknown label is
    that user's ValueError; the others equal their per-user results."""
    config = _config(no_dropout_models["encoder"], "local_only")
    users, task = _users(config)
    loaded = models.build_model(config, len(task.labels))
    states = [dict(loaded.init_state) for _ in SIZES]
    head = next(k for k in loaded.init_state if k.endswith("classifier.modules_to_save.default.weight"))
    states[1][head] = torch.full_like(states[1][head], float("nan"))
    trains = [u.train[:n] for u, n in zip(users, SIZES)]
    trains.append([Example("x", "text", ("not-a-label",))])
    states.append(dict(loaded.init_state))
    seeds = [*SEEDS, 14]

    outcomes = train_packed(loaded, states, trains, task, config, seeds)
    assert isinstance(outcomes[1].error, TrainingDiverged) and "non-finite loss at step 1" in str(outcomes[1].error)
    assert isinstance(outcomes[3].error, ValueError) and "not-a-label" in str(outcomes[3].error)
    for u in (0, 1, 2):
        models.load_adapter_state(loaded, states[u])
        if u == 1:
            with pytest.raises(TrainingDiverged, match="non-finite loss at step 1"):
                train_user(loaded, trains[u], task, config, seeds[u])
            continue
        result = train_user(loaded, trains[u], task, config, seeds[u])
        _close("encoder/failing", models.adapter_state(loaded), outcomes[u].state)
        assert outcomes[u].result == pytest.approx(result, rel=1e-5)


def test_packed_refuses_a_batch_listener(no_dropout_models):
    config = _config(no_dropout_models["encoder"], "local_only")
    users, task = _users(config)
    loaded = models.build_model(config, len(task.labels))
    with batch_listener(lambda examples, rows: None), pytest.raises(ValueError, match="batch listener"):
        train_packed(loaded, [loaded.init_state], [users[0].train], task, config, [1])


def test_what_packs_and_why_not():
    for name in PACKABLE_STRATEGIES:
        assert packing_incompatibility("lora", name) is None
    cases = {("prompt_tuning", "fedavg", ()): "virtual tokens", ("prefix_tuning", "local_only", ()): "prefixes",
             ("ia3", "fedavg", ()): "IA3", ("dora", "fedsa", ()): "DoRA", ("lora", "feddpa", ()): "two adapters",
             ("lora", "oppu", ("personal",)): "personal LoRA adapter", ("lora", "mine", ()): "not known to pack",
             ("lora", "local_only", ("extra",)): "extra"}
    for (method, strategy, extra), words in cases.items():
        why = packing_incompatibility(method, strategy, extra)
        assert why is not None and words in why and "train.pack_users=1" in why, why
    config = Config()
    config.peft.method = "loha"
    assert "LoHa" in packing_incompatibility(config, "fedavg")


def test_packing_imports_neither_flwr_nor_ray():
    import subprocess
    import sys

    code = ("import sys, fedpeft.learning.packing; bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
