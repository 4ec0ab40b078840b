"""feddpa's mixing of its global and local adapters, measured in the forward passes themselves.

A spy on every LoRA layer solves, per row of each forward pass, output - base(x) =
a_g B_g A_g x + a_l B_l A_l x for (a_g, a_l): the mix that row got is lambda = a_l / (a_g + a_l),
whatever mechanism applied it. Inputs carry a one-token marker word first, so each row is tied to
its example from the token ids the backbone receives.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedpeft.config import Config, ConfigError
from fedpeft.data import TaskSpec, UserData, get_benchmark
from fedpeft.federation.client_app import run_evaluate, run_train
from fedpeft.federation.messages import Request
from fedpeft.federation.store import AdapterStore
from fedpeft.learning.models import LoadedModel, adapter_state, compose_user_model, get_model
from fedpeft.learning.training import predict, train_user
from fedpeft.strategies import make_strategy

MARKERS = ("alpha bravo charlie delta echo golf india juliet lima mike november oscar papa romeo sierra "
           "tango uniform victor yankee zebra").split()  # one token each in the MiniLM vocabulary
TOL = 1e-4


@pytest.fixture
def backbones(tiny_bert, tiny_t5, tiny_gpt2) -> dict[str, Path]:
    return {"bert": tiny_bert, "t5": tiny_t5, "gpt2": tiny_gpt2}


def dpa_config(path: Path, tmp_path: Path, mode: str = "per_input", mix: float = 0.5) -> Config:
    cfg = Config()
    cfg.model.name = str(path)
    cfg.federation.strategy = "feddpa"
    cfg.strategy.feddpa_mode, cfg.strategy.feddpa_mix = mode, mix
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 2, 8, 5
    cfg.train.steps, cfg.train.batch_size, cfg.train.eval_batch_size = 2, 4, 16
    cfg.model.max_new_tokens = 3
    cfg.output.store_dir = str(tmp_path / f"store-{mode}")
    return cfg


def model_for(cfg: Config) -> LoadedModel:
    return get_model(cfg, len(get_benchmark(cfg).task().labels), make_strategy(cfg).extra_adapters)


def random_b(loaded: LoadedModel, seed: int = 1) -> dict[str, torch.Tensor]:
    """Non-zero B matrices for both adapters, so that both contribute and the mix is measurable."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in loaded.init_state.items() if ".lora_B." in k}


def marked_user(cfg: Config) -> UserData:
    """User 0 of the synthetic benchmark, each text led by its own marker; the test split holds
    three of the training texts, then the user's own test texts."""
    user = get_benchmark(cfg).load_user(0)
    train = [replace(ex, text=f"{MARKERS[i]} {ex.text}") for i, ex in enumerate(user.train)]
    test = [replace(ex, text=f"{MARKERS[len(train) + i]} {ex.text}") for i, ex in enumerate(user.test)]
    return UserData(user.user_id, train, [], train[:3] + test)


class MixSpy:
    """Records the mix (lambda) and the total weight (a_g + a_l) each row of each forward pass got,
    by example text when ``texts`` maps marker token ids to texts."""

    def __init__(self, loaded: LoadedModel, texts: dict[int, str] | None = None) -> None:
        from peft.tuners.lora import LoraLayer

        self.loaded, self.texts = loaded, texts or {}
        self.rows: list[str] | None = None
        self.mix: dict[str, list[float]] = defaultdict(list)
        self.totals: list[float] = []
        self.batch_sizes: list[int] = []
        backbone = loaded.model.get_base_model()
        stack = backbone.get_encoder() if loaded.kind == "seq2seq" else backbone.base_model
        self.handles = [stack.register_forward_pre_hook(self._inputs, with_kwargs=True)]
        self.handles += [m.register_forward_hook(self._measure) for m in loaded.model.modules() if isinstance(m, LoraLayer)]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def all_mixes(self) -> list[float]:
        return [w for ws in self.mix.values() for w in ws]

    def _inputs(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or (ids.shape[1] == 1 and self.rows is not None and len(self.rows) == len(ids)):
            return  # a decoding step of the batch already seen
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        special = set(self.loaded.tokenizer.all_special_ids)
        firsts = [next(int(t) for t, m in zip(row, keep) if m and int(t) not in special) for row, keep in zip(ids, mask)]
        self.rows = [self.texts.get(t, "?") for t in firsts]

    @torch.no_grad()
    def _measure(self, module, args, output) -> None:
        if module.disable_adapters or module.merged:
            return  # the frozen backbone (e.g. embedding inputs for the similarities)
        x = args[0]
        lora = [torch.nn.functional.linear(torch.nn.functional.linear(x, module.lora_A[n].weight), module.lora_B[n].weight)
                for n in ("default", "local")]
        delta = (output - module.base_layer(x)).double().reshape(len(x), -1)
        glob, loc = (d.double().reshape(len(x), -1) for d in lora)
        self.batch_sizes.append(len(x))
        for i in range(len(x)):
            a_g, a_l = torch.linalg.lstsq(torch.stack([glob[i], loc[i]], 1), delta[i].unsqueeze(1)).solution.flatten().tolist()
            self.totals.append(a_g + a_l)
            self.mix[self.rows[i] if self.rows and len(self.rows) == len(x) else "?"].append(a_l / (a_g + a_l))


def spied(loaded: LoadedModel, user: UserData | None = None) -> MixSpy:
    texts = {}
    for ex in (user.train + user.test) if user else []:
        texts[loaded.tokenizer(ex.text, add_special_tokens=False)["input_ids"][0]] = ex.text
    return MixSpy(loaded, texts)


def local_round(cfg: Config, loaded: LoadedModel, user: UserData, task: TaskSpec) -> dict[str, float]:
    """One client round of feddpa, driven directly: configure, then both training passes."""
    strategy = make_strategy(cfg)
    strategy.configure_model(loaded, "federated")

    def train(trainable=lambda key: True, epochs=None):
        return train_user(loaded, user.train, task, cfg, seed=3, trainable=trainable, epochs=epochs)

    return strategy.local_train(train, strategy.phases()[0])


def per_text(spy: MixSpy) -> dict[str, float]:
    """The one mix each example got (asserting that all its rows, layers and steps agree)."""
    out = {}
    for text, mixes in spy.mix.items():
        assert text != "?", "a row could not be tied to its example"
        assert max(mixes) - min(mixes) < TOL, f"'{text}' was mixed at {min(mixes):.5f}..{max(mixes):.5f} within one run"
        out[text] = mixes[0]
    return out


# ---- per_input on every backbone kind, through the client code -------------------------------------

@pytest.mark.parametrize("kind", ["bert", "t5", "gpt2"])
def test_per_input_trains_and_predicts_on_every_backbone_kind(kind, backbones, tmp_path):
    cfg = dpa_config(backbones[kind], tmp_path)
    strategy, loaded = make_strategy(cfg), model_for(cfg)
    weights = random_b(loaded)
    shared = {k: v for k, v in weights.items() if strategy.is_shared(k, "federated")}
    AdapterStore(cfg.output.store_dir).save(get_benchmark(cfg).user_ids()[0], {k: v for k, v in weights.items() if k not in shared}, 1)
    spy = spied(loaded)
    try:
        sent, stats, _ = run_train(Request(cfg, 2, "federated", shared, private_round=1), 0)
        trained = spy.all_mixes()
        spy.mix.clear()
        scores, outputs, _ = run_evaluate(Request(cfg, 2, "federated", sent, private_round=2), 0)
    finally:
        spy.close()
    assert stats["steps"] == 4 and math.isfinite(stats["train_loss"])
    assert len(outputs["predictions"]) == scores["n_test"] == 5
    for mixes in (trained, spy.all_mixes()):
        assert max(mixes) - min(mixes) > 1e-3, "per_input gave every input the same mix"
        assert all(-TOL <= w <= cfg.strategy.feddpa_mix + TOL for w in mixes)
    expected_total = 2 * cfg.peft.alpha / cfg.peft.r  # 2(1 - lambda) + 2 lambda of alpha / r
    assert all(abs(t - expected_total) < 1e-3 for t in spy.totals)


# ---- the same mix in training and at test ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["bert", "t5", "gpt2"])
def test_training_and_test_mix_an_input_the_same_way(kind, backbones, tmp_path):
    cfg = dpa_config(backbones[kind], tmp_path)
    loaded, user, task = model_for(cfg), marked_user(cfg), get_benchmark(cfg).task()
    compose_user_model(loaded, random_b(loaded), None)
    spy = spied(loaded, user)
    try:
        local_round(cfg, loaded, user, task)
        in_training = per_text(spy)
        spy.mix.clear()
        make_strategy(cfg).predict(loaded, user, task)
        at_test = per_text(spy)
    finally:
        spy.close()
    assert set(in_training) == {ex.text for ex in user.train}  # every training input was seen
    assert set(at_test) == {ex.text for ex in user.test}
    for ex in user.test[:3]:  # training texts, asked again at test time
        assert at_test[ex.text] == pytest.approx(in_training[ex.text], abs=TOL), ex.text
    assert max(in_training.values()) - min(in_training.values()) > 1e-3
    assert all(0 <= w <= cfg.strategy.feddpa_mix + TOL for w in [*in_training.values(), *at_test.values()])


# ---- batched prediction ---------------------------------------------------------------------------

def predict_in_batches_of(size: int, cfg: Config, loaded: LoadedModel, user: UserData, task: TaskSpec):
    """(predictions, mix per text, largest batch a LoRA layer saw, class scores per row or None)."""
    cfg.train.eval_batch_size = size
    strategy = make_strategy(cfg)
    strategy.configure_model(loaded, "federated")
    spy = spied(loaded, user)
    scores: list[torch.Tensor] = []  # an encoder's class scores, row by row
    hook = loaded.model.register_forward_hook(lambda m, a, out: scores.extend(out.logits.float()))
    try:
        preds = strategy.predict(loaded, user, task)
    finally:
        spy.close()
        hook.remove()
    return preds, per_text(spy), max(spy.batch_sizes), torch.stack(scores) if scores else None


@pytest.mark.parametrize("kind", ["bert", "t5", "gpt2"])
def test_batched_per_input_predictions_equal_one_at_a_time(kind, backbones, tmp_path):
    cfg = dpa_config(backbones[kind], tmp_path)
    loaded, user, task = model_for(cfg), marked_user(cfg), get_benchmark(cfg).task()
    compose_user_model(loaded, random_b(loaded), None)
    single = predict_in_batches_of(1, cfg, loaded, user, task)
    batched = predict_in_batches_of(16, cfg, loaded, user, task)
    assert batched[2] == len(user.test) and single[2] == 1  # one forward pass for all, one per input
    assert batched[0] == single[0]
    assert batched[1] == pytest.approx(single[1], abs=1e-5)
    if kind == "bert":
        torch.testing.assert_close(batched[3], single[3], atol=1e-5, rtol=1e-5)


# ---- fixed mode: unchanged --------------------------------------------------------------------------

def reference_fixed_round(cfg: Config, loaded: LoadedModel, user: UserData, task: TaskSpec) -> list[str]:
    """feddpa_mode=fixed spelled out: global scaling (alpha/r) 2(1-mix), local (alpha/r) 2 mix;
    train the global adapter and head, then the local adapter and head; predict in batches."""
    from peft.tuners.lora import LoraLayer

    mix, base = cfg.strategy.feddpa_mix, cfg.peft.alpha / cfg.peft.r
    for module in loaded.model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"], module.scaling["local"] = base * 2 * (1 - mix), base * 2 * mix
    head = ("classifier.", "score.")
    train_user(loaded, user.train, task, cfg, seed=3, trainable=lambda k: (".default." in k and not any(h in k for h in head)) or any(h in k for h in head))
    train_user(loaded, user.train, task, cfg, seed=3, trainable=lambda k: ".local." in k or any(h in k for h in head))
    return predict(loaded, user.test, task, cfg)


@pytest.mark.parametrize("kind", ["bert", "t5", "gpt2"])
def test_fixed_mode_is_unchanged(kind, backbones, tmp_path):
    cfg = dpa_config(backbones[kind], tmp_path, mode="fixed", mix=0.3)
    loaded, user, task = model_for(cfg), marked_user(cfg), get_benchmark(cfg).task()
    start = random_b(loaded)
    compose_user_model(loaded, start, None)
    expected_preds, expected_state = reference_fixed_round(cfg, loaded, user, task), adapter_state(loaded)
    compose_user_model(loaded, start, None)
    spy = spied(loaded, user)
    try:
        local_round(cfg, loaded, user, task)
        preds = make_strategy(cfg).predict(loaded, user, task)
    finally:
        spy.close()
    assert preds == expected_preds
    state = adapter_state(loaded)
    assert all(torch.equal(state[k], expected_state[k]) for k in state)
    assert all(abs(w - 0.3) < TOL for w in spy.all_mixes())


# ---- the pieces ---------------------------------------------------------------------------------------

def test_similarity_is_the_mean_over_other_texts_clipped():
    from fedpeft.strategies.feddpa import similarity_to_others

    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    refs, ref_texts = torch.stack([e1, e2, e1]), ["a", "b", "a"]
    queries = torch.stack([e1, (e1 + e2) / math.sqrt(2), -e2, e1])
    got = similarity_to_others(queries, ["a", "z", "y", "a"], refs, ref_texts)
    # "a": only "b" is another text (cos 0); "z": all three (cos 1/sqrt 2); "y": -1 and 0, clipped to 0
    assert got.tolist() == pytest.approx([0.0, 1 / math.sqrt(2), 0.0, 0.0], abs=1e-6)
    assert similarity_to_others(e1[None], ["a"], e1[None], ["a"]).tolist() == [1.0]  # no other text: 1


@pytest.mark.parametrize("method,targets", [("dora", []), ("lora", ["query", "word_embeddings"])])
def test_per_input_refuses_adapters_it_cannot_weight_per_row(method, targets, tiny_bert, tmp_path):
    for mode in ("fixed", "per_input"):
        cfg = dpa_config(tiny_bert, tmp_path, mode=mode)
        cfg.peft.method, cfg.peft.target_modules = method, targets
        strategy = make_strategy(cfg)
        keys = model_for(cfg).adapter_keys
        if mode == "fixed":
            strategy.check_compatible(keys)
            continue
        with pytest.raises(ConfigError, match="feddpa_mode=per_input.*found '.*(magnitude|embedding)"):
            strategy.check_compatible(keys)


def test_per_input_export_is_refused(tiny_bert, tmp_path):
    cfg = dpa_config(tiny_bert, tmp_path)
    with pytest.raises(ConfigError, match="per_input.*feddpa_mode=fixed"):
        make_strategy(cfg).prepare_export(model_for(cfg))
