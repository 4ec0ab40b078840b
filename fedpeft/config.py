"""The single config schema of fedpeft: every default lives here, and the key access on it.

The dataclasses below give every key its type, default and help. :func:`set_key` sets one dotted
key (or a flag of :data:`FLAG_ALIASES`), coercing a YAML or command-line value to the key's type
(:func:`coerce`); :func:`merge_into` and :meth:`Config.from_dict` set many. Unknown keys and bad
values raise :class:`ConfigError` naming the key, the value, what is allowed and the closest
valid key. This module imports nothing of fedpeft; above it, in the same bottom layer,
:mod:`fedpeft.config_checks` holds the value checks (choices, number ranges, :func:`validate`)
and :mod:`fedpeft.config_load` builds a run's config from defaults, YAML files and overrides
(:func:`~fedpeft.config_load.build_config`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A config key or value a user gave is not valid; the message says how to fix it."""


@dataclass
class DataConfig:
    benchmark: str = field(default="synthetic", metadata={"help": "benchmark: synthetic (built in), peft-u/<task>, lamp/LaMP-<n>"})
    path: str = field(default="", metadata={"help": "peft-u: prepared per-user JSON file (or its folder); lamp: folder of the official files"})
    cache_dir: str = field(default="", metadata={"help": "where processed benchmark data is cached; '' = ~/.cache/fedpeft"})
    lamp_split: str = field(default="user", metadata={"help": "lamp: 'user' (one question = one user) or 'time' (records carry user_id)"})
    lamp_questions: str = field(default="dev", metadata={"help": "lamp: which questions are scored: dev (gold outputs available) or train"})
    retrieval_k: int = field(default=0, metadata={"help": "lamp: BM25 top-k history items put before the input (0 = off)"})
    seed: int = field(default=0, metadata={"help": "data seed (users, splits, personas); separate from the model seed"})
    num_users: int = field(default=20, metadata={"help": "synthetic: number of users"})
    train_per_user: int = field(default=16, metadata={"help": "synthetic: training examples per user"})
    train_per_user_min: int = field(default=0, metadata={"help": "synthetic: users of different activity: each user's training examples drawn uniformly from [train_per_user_min, train_per_user]; 0 = every user has train_per_user"})
    val_per_user: int = field(default=8, metadata={"help": "synthetic: validation examples per user"})
    test_per_user: int = field(default=24, metadata={"help": "synthetic: test examples per user"})
    personas: int = field(default=4, metadata={"help": "synthetic: latent personas that decide most labels"})
    persona_divergence: float = field(default=0.3, metadata={"help": "synthetic: chance that a persona departs from the consensus label of a (topic, tone) cell"})
    noise: float = field(default=0.1, metadata={"help": "synthetic: chance that a user departs from its persona on a (topic, tone) cell"})
    num_labels: int = field(default=3, metadata={"help": "synthetic: number of labels"})
    pool_size: int = field(default=400, metadata={"help": "synthetic: size of the shared pool of texts users label"})
    new_users: str = field(default="0", metadata={"help": "users held out of every training cohort (drawn with data.seed, the same for every strategy): 0 (none), a fraction in (0, 1) of the users (0.2: a fifth, rounded, at least 1), or a count written count:N (count:4; a whole number >= 2 is a count too; 1 is refused: write count:1 or a fraction). At the end each one takes the final shared part, trains its private part on its own training split (federation.new_user_epochs) and is scored as its own group"})
    max_train_per_user: int = field(default=0, metadata={"help": "cap each user's training split at this many examples (a seeded draw, the same for every strategy; a smaller cap keeps a subset of a larger one); validation and test unchanged; 0 = all"})
    max_length: int = field(default=0, metadata={"help": "tokens per model input; retrieved history is cut first, the question last (in its middle); 0 = the benchmark's default (synthetic 32, peft-u 128, lamp 512)"})
    split: str = field(default="by_text", metadata={"help": "peft-u: how each user's examples are split into train/val/test. by_text: each text goes to one split for all users (PEFT-U's no-leak variant: texts shuffled with data.seed, 80/10/10 with at least 2 held out, no per-label minimum; data.seed=42 gives PEFT-U's own no-leak file where sample ids name texts), so no user's val or test text is in anyone's training split; a user left without training or test examples is skipped. leaked: the prepared file's own per-user splits (PEFT-U's default, used in its paper), where one user's test text is in other users' training splits. A run folder written before this key existed resumes with leaked"})


@dataclass
class ModelConfig:
    name: str = field(default="minilm", metadata={"help": "backbone: 'minilm' (embedded all-MiniLM-L6-v2), a Hugging Face name or a local path"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32, bfloat16 (CPU or GPU), float16 (GPU clients, generative backbones only: an encoder's head diverges in float16)"})
    kind: str = field(default="auto", metadata={"help": "backbone kind: auto (from its config), encoder (classification head), seq2seq, causal"})
    max_new_tokens: int = field(default=16, metadata={"help": "seq2seq/causal: tokens generated per answer (greedy)"})


@dataclass
class PeftConfig:
    method: str = field(default="lora", metadata={"help": "PEFT method: lora, dora, ia3, prompt_tuning, prefix_tuning, p_tuning, loha, lokr, vera, bottleneck, zero_shot, few_shot"})
    r: int = field(default=8, metadata={"help": "rank (lora, dora, loha, lokr, vera)"})
    alpha: int = field(default=16, metadata={"help": "scaling alpha (lora, dora, loha, lokr)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout (lora, dora; rank dropout for loha, lokr; vera)"})
    target_modules: list[str] = field(default_factory=list, metadata={"help": "modules to adapt (comma list); empty = peft's default for the backbone family"})
    feedforward_modules: list[str] = field(default_factory=list, metadata={"help": "ia3: which target modules are feed-forward (scaled on their input)"})
    num_virtual_tokens: int = field(default=20, metadata={"help": "prompt_tuning, prefix_tuning, p_tuning: virtual tokens"})
    encoder_type: str = field(default="mlp", metadata={"help": "p_tuning: prompt encoder, mlp or lstm"})
    encoder_hidden_size: int = field(default=128, metadata={"help": "p_tuning / prefix_tuning with projection: encoder hidden size"})
    prefix_projection: bool = field(default=False, metadata={"help": "prefix_tuning: reparameterise the prefix with an MLP"})
    adapter_type: str = field(default="pfeiffer", metadata={"help": "bottleneck: pfeiffer (after feed-forward) or houlsby (after attention and feed-forward)"})
    reduction_factor: int = field(default=16, metadata={"help": "bottleneck: hidden size / bottleneck size"})
    few_shot_k: int = field(default=4, metadata={"help": "few_shot: the user's own training examples put in the prompt"})
    target_params: int = field(default=0, metadata={"help": "> 0: scale the method's size knob (rank, virtual tokens, reduction factor) to about this many trainable parameters"})


@dataclass
class TrainConfig:
    lr: float = field(default=5e-3, metadata={"help": "client learning rate (AdamW)"})
    epochs: int = field(default=2, metadata={"help": "local epochs per round (a strategy's own epoch budgets are separate keys)"})
    steps: int = field(default=0, metadata={"help": "local steps per round; > 0 replaces train.epochs only, never a strategy's epoch budget (strategy.fedrep_head_epochs, strategy.finetune_epochs, pooled strategy.oppu_task_rounds)"})
    batch_size: int = field(default=8, metadata={"help": "client batch size"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    eval_batch_size: int = field(default=32, metadata={"help": "batch size for evaluation"})
    lr_schedule: str = field(default="constant", metadata={"help": "client learning rate over rounds: constant, linear, cosine"})
    lr_min_factor: float = field(default=0.1, metadata={"help": "linear/cosine: the last round's lr as a fraction of train.lr"})
    pack_users: int = field(default=1, metadata={"help": "users a worker trains and scores together in one forward pass (cohort packing: their LoRA adapters and heads stacked, each user its own optimizer, seed and batches; results equal one user at a time within float tolerance, dropout off). 1 = one user per call. > 1 needs peft.method=lora and one of the strategies local_only, fedavg, fedavg_ft, fedper, fedrep, fedsa, ffa"})


@dataclass
class FederationConfig:
    strategy: str = field(default="local_only", metadata={"help": "strategy (see strategies/): which adapter keys are shared; also module:Class or an installed fedpeft.strategies entry point"})
    rounds: int = field(default=8, metadata={"help": "number of rounds (of the main phase)"})
    cohort_fraction: float = field(default=1.0, metadata={"help": "fraction of users sampled per round, in (0, 1]"})
    cohort_size: int = field(default=0, metadata={"help": "users sampled per round; > 0 replaces cohort_fraction"})
    eval_every: int = field(default=1, metadata={"help": "evaluate every N rounds (the last round is always evaluated)"})
    eval_fraction: float = field(default=1.0, metadata={"help": "fraction of users scored at intermediate evaluations; the final one scores all"})
    eval_max_users: int = field(default=200, metadata={"help": "at most this many users (a seeded sample) scored at an intermediate evaluation, 0: no cap. With the defaults a run of up to 200 users scores everyone every round, and one of 15,000 scores 200 per round and everyone at the end"})
    server_optimizer: str = field(default="fedavg", metadata={"help": "server step on the aggregate of the shared keys, Flower's: fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad (other than fedavg: federation.aggregator=mean only)"})
    server_lr: float = field(default=0.01, metadata={"help": "fedadam/fedyogi/fedadagrad: server learning rate (eta); fedavgm: its server learning rate (1.0 is the plain mean plus momentum)"})
    server_beta1: float = field(default=0.9, metadata={"help": "fedadam/fedyogi: first-moment decay; fedavgm: server momentum"})
    server_beta2: float = field(default=0.99, metadata={"help": "fedadam/fedyogi: second-moment decay"})
    server_tau: float = field(default=1e-3, metadata={"help": "fedadam/fedyogi/fedadagrad: adaptivity (epsilon)"})
    proximal_mu: float = field(default=0.01, metadata={"help": "fedprox: weight of the proximal term on shared keys"})
    aggregator: str = field(default="mean", metadata={"help": "how the shared updates are combined, Flower's strategies: mean (example-weighted, FedAvg), median (FedMedian, coordinate-wise), trimmed_mean (FedTrimmedAvg, federation.trim_beta), krum / multikrum (federation.byzantine_users, federation.multikrum_keep), qfedavg (q-FFL, federation.qffl_q). Other than mean: no privacy and server_optimizer=fedavg"})
    trim_beta: float = field(default=0.2, metadata={"help": "trimmed_mean: fraction of the updates cut at each end, per coordinate, in [0, 0.5)"})
    byzantine_users: int = field(default=0, metadata={"help": "krum/multikrum: Byzantine users assumed per round, f; needs users per round >= 2f + 3"})
    multikrum_keep: int = field(default=0, metadata={"help": "multikrum: updates kept (lowest Krum scores) and averaged; 0 = the replies less federation.byzantine_users"})
    qffl_q: float = field(default=0.1, metadata={"help": "qfedavg: q of q-FFL (0: no reweighting by loss; larger: more weight to users with a high train_loss)"})
    call_timeout: float = field(default=1800.0, metadata={"help": "seconds one client call may run per user it carries (train.pack_users); a longer call is its users' failure for the round and its worker process is replaced"})
    select: str = field(default="final", metadata={"help": "which round's test score each user reports, chosen on validation, never on test: final (the last round: today's numbers), best_val (the round with the best mean validation score), best_val_per_user (each user's own best validation round). predictions.jsonl and exports are the final model either way"})
    new_user_epochs: int = field(default=0, metadata={"help": "epochs a new user (data.new_users) trains its private part on top of the final shared part before it is scored; 0 = the run's local budget of one round (train.steps or train.epochs)"})
    message_window: int = field(default=64, metadata={"help": "messages in flight at once (0: a whole round at once); results do not depend on it. Flower's simulation scans every node for every message in flight, so thousands of users want a window"})
    max_failed_fraction: float = field(default=0.1, metadata={"help": "the run's verdict (results.json status): failed when more than this fraction of the users failed, diverged or trained fewer rounds than scheduled (the run still writes everything, then exits non-zero); degraded when any did; ok otherwise. In [0, 1]"})
    availability: str = field(default="const:1", metadata={"help": "each user's probability of being online in a round, drawn once per user from data.seed: const:P, uniform:LO,HI or beta:A,B; or trace:PATH.csv (a header user,1,2,...,R and one 0/1 row per user). A round's cohort is sampled from the users online in it. const:1 = everyone, always"})
    dropout_rate: float = field(default=0.0, metadata={"help": "probability that a sampled user drops out mid-round and never replies (drawn from data.seed, the user and the round); its private part stays as it was before the round, and under privacy it counts as a zero update. In [0, 1)"})
    speed: str = field(default="const:1", metadata={"help": "each user's simulated speed, drawn once per user from data.seed: const:S or lognormal:SIGMA (e^N(0, SIGMA^2), median 1); at speed 1 a user processes one training example per simulated second"})
    stragglers: str = field(default="drop", metadata={"help": "a user too slow for federation.deadline: drop (its reply comes too late and is dropped; its work is lost) or partial (it is told to stop at the deadline: it runs the train.steps that fit, FedProx-style, and its shorter update is kept; a user that cannot finish one step is dropped). partial needs train.pack_users=1"})
    deadline: float = field(default=0.0, metadata={"help": "simulated seconds a round waits for replies (0 = wait for everyone); a reply whose local work (examples processed / speed) takes longer is dropped: the user's work is lost, as under dropout_rate. Rounds are logged against the simulated clock (sim_time)"})
    num_nodes: int = field(default=0, metadata={"help": "simulated Flower nodes that carry the users' calls (every message names its user; a call's messages go round-robin over the nodes, so results do not depend on it); 0 = one per user, up to 2 x message_window. Flower scans every node for every message in flight, so one node per user would make each message cost grow with the users"})


@dataclass
class StrategyConfig:
    fedper_layers: int = field(default=3, metadata={"help": "fedper: adapter keys of layers below this index are shared"})
    fedper_pattern: str = field(default="", metadata={"help": "fedper: regex; if set, adapter keys matching it are shared (replaces fedper_layers)"})
    fedrep_head_epochs: int = field(default=1, metadata={"help": "fedrep: head-only epochs (always epochs) before the body's train.epochs / train.steps each round"})
    finetune_epochs: int = field(default=2, metadata={"help": "fedavg_ft: local fine-tune epochs (always epochs) after the federated rounds"})
    feddpa_mix: float = field(default=0.5, metadata={"help": "feddpa: weight of the local adapter against the global one, in [0, 1] (per_input: the largest weight, scaled by each input's similarity)"})
    feddpa_mode: str = field(default="fixed", metadata={"help": "feddpa: mixing weight 'fixed' or 'per_input' (similarity to the user's data)"})
    ditto_lambda: float = field(default=0.1, metadata={"help": "ditto: lambda of the proximal term lambda/2 ||v - w||^2 that pulls each user's personal adapter v towards the global adapter w received this round (0: plain local training)"})
    ditto_personal_epochs: int = field(default=0, metadata={"help": "ditto: local epochs (always epochs) of the personal adapter's update each round; 0 = the same budget as the global adapter's update (train.steps / train.epochs)"})
    oppu_task_rounds: int = field(default=3, metadata={"help": "oppu: federated rounds (each train.epochs / train.steps), or with oppu_task_mode=pooled epochs over all users' data, training the task adapter before personal adapters"})
    oppu_task_mode: str = field(default="federated", metadata={"help": "oppu: task adapter trained 'federated' or 'pooled' on all users' data as in the paper"})


@dataclass
class PrivacyConfig:
    mechanism: str = field(default="none", metadata={"help": "user-level differential privacy on the shared part (one user = the unit of privacy; private keys never leave and need none): none, central (Flower's server-side fixed clipping), central_adaptive (server-side adaptive clipping, privacy.clipping_norm is the initial norm), client (each client clips its own shared update, the server adds the noise). Under privacy the shared updates are averaged with equal weights per user"})
    noise_multiplier: float = field(default=1.0, metadata={"help": "Gaussian noise std on the sum of clipped updates / clipping norm (the mean gets noise_multiplier x clipping_norm / users sampled), >= 0; 0 = clipping only (epsilon infinite). Replaced by the calibrated value when privacy.target_epsilon > 0"})
    clipping_norm: float = field(default=1.0, metadata={"help": "L2 bound on each user's shared update (its change of the shared part in a round), > 0; central_adaptive: the initial bound"})
    delta: float = field(default=0.0, metadata={"help": "delta of the reported (epsilon, delta); 0 = automatic: min(1e-5, 1 / (10 x users in the training population)), the conventional delta well below 1 / users; a given value must lie in (0, 1 / users)"})
    target_epsilon: float = field(default=0.0, metadata={"help": "> 0: calibrate privacy.noise_multiplier before the run so that all rounds together spend this epsilon (given the rounds, the cohort size and delta); 0 = off (use privacy.noise_multiplier)"})
    max_epsilon: float = field(default=0.0, metadata={"help": "> 0: stop training before a round whose release would take the spent epsilon past this value (the run still evaluates); 0 = off"})
    target_clipped_quantile: float = field(default=0.5, metadata={"help": "central_adaptive: fraction of updates the clipping norm aims to clip, in [0, 1] (Flower's default)"})
    clip_norm_lr: float = field(default=0.2, metadata={"help": "central_adaptive: learning rate of the geometric clipping-norm update, > 0 (Flower's default)"})
    clipped_count_stddev: float = field(default=0.0, metadata={"help": "central_adaptive: std of the noise on the count of clipped updates; 0 = Flower's default, users sampled / 20; privacy.noise_multiplier must stay below twice this value"})


@dataclass
class CompareConfig:
    strategies: list[str] = field(default_factory=list, metadata={"help": "sims/compare.py: strategies side by side (comma list); empty = all"})
    baseline: str = field(default="local_only", metadata={"help": "sims/compare.py: strategy gains are measured against"})
    out: str = field(default="", metadata={"help": "sims/compare.py: comparison folder; '' = <output.dir>/compare-<time>"})
    seeds: list[int] = field(default_factory=list, metadata={"help": "sims/compare.py: model seeds, each strategy runs once per seed (comma list; data.seed stays fixed, so users are the same); empty = the run's seed"})
    train_caps: list[str] = field(default_factory=lambda: ["4", "8", "16", "all"], metadata={"help": "sims/where_sharing_pays.py: the training examples per user (data.max_train_per_user) of each comparison, comma list; 'all' = every example"})
    select: str = field(default="best_val", metadata={"help": "sims/compare.py: round rule of the per-user paired statistics, p10 and scatter plot (final, best_val, best_val_per_user); the table gives the headline under best_val and final either way"})


@dataclass
class RayConfig:
    address: str = field(default="", metadata={"help": "'' starts a local Ray; 'auto' or HOST:PORT joins a running cluster"})
    num_cpus: int = field(default=0, metadata={"help": "CPUs of the local Ray (0 = all cores); ignored on a cluster"})
    client_cpus: float = field(default=1.0, metadata={"help": "CPUs per client actor"})
    client_gpus: float = field(default=0.0, metadata={"help": "GPUs per client actor (fractions share a GPU)"})


@dataclass
class WandbConfig:
    mode: str = field(default="disabled", metadata={"help": "W&B mode: disabled, offline, online"})
    project: str = field(default="fedpeft", metadata={"help": "W&B project"})
    entity: str = field(default="", metadata={"help": "W&B entity (team or user); '' = your default"})
    group: str = field(default="", metadata={"help": "W&B group"})
    name: str = field(default="", metadata={"help": "W&B run name; '' = the run folder's name"})
    tags: list[str] = field(default_factory=list, metadata={"help": "W&B tags (comma list)"})


@dataclass
class OutputConfig:
    dir: str = field(default="runs", metadata={"help": "parent folder of run folders"})
    name: str = field(default="", metadata={"help": "run folder name; '' = <strategy>-<timestamp>"})
    store_dir: str = field(default="", metadata={"help": "adapter store (must be reachable by every Ray node); '' = <run>/adapters"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})


@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "model seed (adapter init, shuffling, dropout, cohorts)"})
    plugins: list[str] = field(default_factory=list, metadata={"help": "Python modules the driver and every worker import first, to register benchmarks or strategies of your own (comma list; importable on every node)"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        config = cls()
        merge_into(config, data)
        return config


# Flags that stand for dotted keys: the common options of `python -m fedpeft.sim`.
FLAG_ALIASES: dict[str, str] = {
    "strategy": "federation.strategy",
    "benchmark": "data.benchmark",
    "model": "model.name",
    "rounds": "federation.rounds",
    "seed": "seed",
    "select": "federation.select",
    "wandb": "wandb.mode",
    "peft": "peft.method",
    "dtype": "model.dtype",
    "out": "output.dir",
    "name": "output.name",
}


def leaf_fields(obj: Any = None, prefix: str = "") -> typing.Iterator[tuple[str, type, Any, str]]:
    """Yield (dotted key, type, default, help) for every leaf field of the schema (with each
    number key's range in its help: :func:`fedpeft.config_checks.iter_fields`)."""
    obj = Config() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, prefix=f"{key}.")
        else:
            yield key, hints[f.name], value, f.metadata.get("help", "")


def all_keys() -> list[str]:
    return [key for key, *_ in leaf_fields()]


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys() + list(FLAG_ALIASES), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"Unknown config key '{key}' ({where}).{hint} Valid keys are the dotted names listed by "
        "`python -m fedpeft.sim --help`."
    )


def coerce(key: str, value: Any, target: Any) -> Any:
    """Convert ``value`` (from YAML or a command line string) to the field type ``target``."""
    origin = typing.get_origin(target)
    try:
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError
            (item,) = typing.get_args(target) or (str,)
            return [coerce(key, v, item) for v in value]
        if target is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if target is int:
            if isinstance(value, bool):
                raise TypeError
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if target is float:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"Config key '{key}' got {value!r}, which is not a finite number: NaN and infinities "
                                  f"are refused for every number key. Give a finite number, for example `{key}={_example(target)}`.")
            return number
        if target is str:
            return "" if value is None else str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        name = getattr(target, "__name__", str(target))
        if origin is list:
            name = f"comma list of {(typing.get_args(target) or (str,))[0].__name__}"
        raise ConfigError(
            f"Config key '{key}' got {value!r}, which is not a valid {name}. "
            f"Give a {name}, for example `{key}={_example(target)}`."
        ) from None
    raise ConfigError(f"Config key '{key}' has an unsupported type {target!r}")


def _example(target: Any) -> str:
    if typing.get_args(target) == (int,):
        return "0,1,2"
    return {int: "3", float: "0.01", bool: "true", str: "text"}.get(target, "a,b")


def set_key(config: Config, key: str, value: Any, where: str = "override") -> None:
    """Set one dotted key on ``config``, coercing the value to the schema's type."""
    key = FLAG_ALIASES.get(key, key)
    parts = key.split(".")
    node: Any = config
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(node) or not hasattr(node, part):
            raise _unknown_key(key, where)
        node = getattr(node, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(node) or leaf not in {f.name for f in dataclasses.fields(node)}:
        raise _unknown_key(key, where)
    if dataclasses.is_dataclass(getattr(node, leaf)):
        raise ConfigError(f"Config key '{key}' is a section; set one of its fields, e.g. '{key}.{dataclasses.fields(getattr(node, leaf))[0].name}=...'")
    target = typing.get_type_hints(type(node))[leaf]
    setattr(node, leaf, coerce(key, value, target))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, prefix=f"{key}."))
        else:
            flat[key] = v
    return flat


def merge_into(config: Config, data: dict[str, Any], where: str = "config") -> None:
    for key, value in flatten(data).items():
        set_key(config, key, value, where=where)
