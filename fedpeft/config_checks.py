"""The checks of a config's values that types alone do not catch, and the tables they read.

:data:`CHOICES` (the words a key takes) and :data:`RANGES` (the interval of every number key)
are the one place :func:`validate` checks and ``--help`` shows (:func:`iter_fields` puts each
key's range in its help). :func:`validate` also checks what involves two keys, ``data.new_users``
(:func:`new_users_spec`), a regex and the privacy keys. Like :mod:`fedpeft.config` below it, this
module sits in the config layer: names that registries resolve (strategy, benchmark, plugins)
are checked where a run's config is assembled, :mod:`fedpeft.launch.assemble`.
"""

from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass
from typing import Any

from fedpeft.config import Config, ConfigError, PrivacyConfig, flatten, leaf_fields

CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "data.lamp_split": ("user", "time"),
    "data.lamp_questions": ("dev", "train"),
    "data.split": ("by_text", "leaked"),
    "peft.method": ("lora", "dora", "ia3", "prompt_tuning", "prefix_tuning", "p_tuning", "loha", "lokr", "vera",
                    "bottleneck", "zero_shot", "few_shot"),
    "peft.encoder_type": ("mlp", "lstm"),
    "peft.adapter_type": ("pfeiffer", "houlsby"),
    "model.kind": ("auto", "encoder", "seq2seq", "causal"),
    "train.lr_schedule": ("constant", "linear", "cosine"),
    "federation.server_optimizer": ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"),
    "federation.stragglers": ("drop", "partial"),
    "federation.aggregator": ("mean", "median", "trimmed_mean", "krum", "multikrum", "qfedavg"),
    "federation.select": ("final", "best_val", "best_val_per_user"),
    "compare.select": ("final", "best_val", "best_val_per_user"),
    "strategy.feddpa_mode": ("fixed", "per_input"),
    "strategy.oppu_task_mode": ("federated", "pooled"),
    "privacy.mechanism": ("none", "central", "central_adaptive", "client"),
    "wandb.mode": ("disabled", "offline", "online"),
}

# The range of every number key (list items too): the one place validate() checks and --help
# shows. Intervals "[a, b]" / "(a, b)" ("inf": unbounded) joined by " or "; a lone number is
# that value alone. Checks that involve two keys stay in validate().
_SEEDS = "[0, 4294967295]"  # what every random generator fedpeft seeds (numpy, torch, random) takes
_COUNT, _POSITIVE, _NONNEG, _FRACTION = "[1, inf)", "(0, inf)", "[0, inf)", "[0, 1]"
RANGES: dict[str, str] = {
    "seed": _SEEDS, "data.seed": _SEEDS, "compare.seeds": _SEEDS,
    "data.retrieval_k": _NONNEG, "data.num_users": _COUNT, "data.train_per_user": _COUNT,
    "data.train_per_user_min": _NONNEG, "data.val_per_user": _COUNT, "data.test_per_user": _COUNT,
    "data.personas": _COUNT, "data.persona_divergence": _FRACTION, "data.noise": _FRACTION,
    "data.num_labels": "[2, inf)", "data.pool_size": _COUNT,
    "data.max_train_per_user": _NONNEG, "data.max_length": "0 or [8, inf)",
    "model.max_new_tokens": _COUNT,
    "peft.r": _COUNT, "peft.alpha": _COUNT, "peft.dropout": "[0, 1)", "peft.num_virtual_tokens": _COUNT,
    "peft.encoder_hidden_size": _COUNT, "peft.reduction_factor": _COUNT, "peft.few_shot_k": _NONNEG,
    "peft.target_params": _NONNEG,
    "train.lr": _POSITIVE, "train.epochs": _NONNEG, "train.steps": _NONNEG, "train.batch_size": _COUNT,
    "train.weight_decay": _NONNEG, "train.eval_batch_size": _COUNT, "train.lr_min_factor": _FRACTION,
    "train.pack_users": _COUNT,
    "federation.rounds": _COUNT, "federation.cohort_fraction": "(0, 1]", "federation.cohort_size": _NONNEG,
    "federation.eval_every": _COUNT, "federation.eval_fraction": "(0, 1]", "federation.eval_max_users": _NONNEG,
    "federation.server_lr": _POSITIVE, "federation.server_beta1": "[0, 1)", "federation.server_beta2": "[0, 1)",
    "federation.server_tau": _POSITIVE, "federation.proximal_mu": _NONNEG, "federation.trim_beta": "[0, 0.5)",
    "federation.byzantine_users": _NONNEG, "federation.multikrum_keep": _NONNEG, "federation.qffl_q": _NONNEG,
    "federation.call_timeout": _POSITIVE,
    "federation.new_user_epochs": _NONNEG, "federation.message_window": _NONNEG,
    "federation.max_failed_fraction": _FRACTION, "federation.num_nodes": _NONNEG,
    "federation.dropout_rate": "[0, 1)", "federation.deadline": _NONNEG,
    "strategy.fedper_layers": _NONNEG, "strategy.fedrep_head_epochs": _COUNT, "strategy.finetune_epochs": _COUNT,
    "strategy.feddpa_mix": _FRACTION, "strategy.oppu_task_rounds": _COUNT,
    "strategy.ditto_lambda": _NONNEG, "strategy.ditto_personal_epochs": _NONNEG,
    "privacy.noise_multiplier": _NONNEG, "privacy.clipping_norm": _POSITIVE, "privacy.delta": "[0, 1)",
    "privacy.target_epsilon": _NONNEG, "privacy.max_epsilon": _NONNEG, "privacy.target_clipped_quantile": _FRACTION,
    "privacy.clip_norm_lr": _POSITIVE, "privacy.clipped_count_stddev": _NONNEG,
    "ray.num_cpus": _NONNEG, "ray.client_cpus": _POSITIVE, "ray.client_gpus": _NONNEG,
}


def _intervals(spec: str) -> list[tuple[float, float, bool, bool]]:
    """RANGES' text -> [(low, high, low included, high included), ...]."""
    out = []
    for part in spec.split(" or "):
        part = part.strip()
        if part[0] in "[(":
            low, high = (float(x) for x in part[1:-1].split(","))
            out.append((low, high, part[0] == "[", part[-1] == "]"))
        else:
            out.append((float(part), float(part), True, True))
    return out


def in_range(value: float, spec: str) -> bool:
    return any((lo < value or (closed_lo and value == lo)) and (value < hi or (closed_hi and value == hi))
               for lo, hi, closed_lo, closed_hi in _intervals(spec))


def _number(x: float) -> str:
    return str(int(x)) if x == int(x) else repr(x)


def describe_range(spec: str, integer: bool = False) -> str:
    """'[1, inf)' -> '>= 1'; '0 or [8, inf)' -> '0 or >= 8'; '(0, 1]' -> 'in (0, 1]'. With
    ``integer`` an interval reads 'an integer ...' (else 'a number ...')."""
    words = []
    for spec_part, (lo, hi, closed_lo, _) in zip(spec.split(" or "), _intervals(spec)):
        if lo == hi:
            words.append(_number(lo))
            continue
        text = f"{'>=' if closed_lo else '>'} {_number(lo)}" if hi == math.inf else f"in {spec_part.strip()}"
        words.append(f"{'an integer' if integer else 'a number'} {text}")
    return " or ".join(words)


def iter_fields(obj: Any = None, prefix: str = "") -> typing.Iterator[tuple[str, type, Any, str]]:
    """Yield (dotted key, type, default, help) for every leaf field of the schema
    (:func:`fedpeft.config.leaf_fields`); a number key's help ends with its range (:data:`RANGES`)."""
    for key, kind, default, help_ in leaf_fields(obj, prefix):
        if key in RANGES:  # every number key: its range, from the table validate() checks
            help_ = f"{help_} [range: {RANGES[key]}]"
        yield key, kind, default, help_


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"Config key '{key}' got {value!r}; allowed: {allowed}.")


def validate(config: Config) -> None:
    """Check values that types alone do not catch. Names that registries resolve (strategy,
    benchmark, plugins) are checked where a run's config is assembled, :mod:`fedpeft.launch.assemble`:
    the config layer imports nothing above it."""
    flat = flatten(config.to_dict())
    for key, allowed in CHOICES.items():
        _check(flat[key] in allowed, key, flat[key], ", ".join(allowed))
    kinds = {key: kind for key, kind, *_ in iter_fields()}
    for key, spec in RANGES.items():
        _check_range(key, flat[key], spec, integer=int in (kinds[key], *typing.get_args(kinds[key])))
    _check(len(set(config.compare.seeds)) == len(config.compare.seeds), "compare.seeds", config.compare.seeds,
           "distinct model seeds, e.g. compare.seeds=0,1,2")
    tr = config.train
    _check(tr.epochs >= 1 or tr.steps >= 1, "train.epochs", tr.epochs, "an integer >= 1 (or set train.steps)")
    da = config.data
    new_users_spec(da.new_users)
    _check(da.train_per_user_min <= da.train_per_user, "data.train_per_user_min", da.train_per_user_min,
           f"0 (every user has data.train_per_user) or a count in 1..{da.train_per_user} (data.train_per_user)")
    st = config.strategy
    if st.fedper_pattern:
        try:
            re.compile(st.fedper_pattern)
        except re.error as err:
            raise ConfigError(f"Config key 'strategy.fedper_pattern' got {st.fedper_pattern!r}, not a valid regex: {err}") from None
    _validate_privacy(config.privacy)
    fed = config.federation
    availability = parse_spec("federation.availability", fed.availability)
    if fed.stragglers == "partial" and config.train.pack_users > 1:
        raise ConfigError("federation.stragglers=partial gives each late user its own number of steps, which a packed call "
                          f"(train.pack_users={config.train.pack_users}) cannot: use train.pack_users=1, or stragglers=drop.")
    parse_spec("federation.speed", fed.speed)
    if config.privacy.mechanism != "none" and availability != Spec("const", (1.0,)):
        raise ConfigError(
            f"federation.availability={fed.availability!r} with privacy.mechanism={config.privacy.mechanism}: a cohort "
            "sampled from the users online in a round is not the uniform sampling of all users that the privacy "
            "accountant assumes, so the epsilon it reports would not hold. Use federation.availability=const:1 with "
            "privacy (dropouts and deadlines are fine: they count as zero updates), or privacy.mechanism=none.")


NEW_USERS_FORMS = ("0 (none), a fraction in (0, 1) of the users such as 0.2, or a count written count:N such as "
                   "count:4 (a whole number >= 2 is read as a count too)")


def new_users_spec(value: str | float) -> tuple[str, float]:
    """``data.new_users`` read unambiguously: ("none", 0), ("fraction", f) with f in (0, 1), or
    ("count", n) with n >= 1 (``count:N``, or a whole number >= 2). Exactly 1 is refused: one
    user or all of them?"""
    text = str(value).strip()
    is_count = text.lower().startswith("count:")
    try:
        number = float(text[6:] if is_count else text)
    except ValueError:
        number = math.nan
    if is_count:
        if number >= 1 and number.is_integer():
            return "count", int(number)
    elif number == 0:
        return "none", 0
    elif 0 < number < 1:
        return "fraction", number
    elif number == 1:
        raise ConfigError(f"Config key 'data.new_users' got {text!r}, which could mean one user or all of them. "
                          "Write count:1 for one user, or a fraction in (0, 1) such as 0.2 for a share of the users.")
    elif number > 1 and number.is_integer():
        return "count", int(number)
    raise ConfigError(f"Config key 'data.new_users' got {text!r}; allowed: {NEW_USERS_FORMS}.")


def _check_range(key: str, value: Any, spec: str, integer: bool) -> None:
    """Refuse a number key (or an item of a list of numbers) outside its range (:data:`RANGES`)."""
    for item in value if isinstance(value, list) else [value]:
        if not in_range(item, spec):
            default = flatten(Config().to_dict())[key]
            example = f"{key}={default}" if not isinstance(default, list) else f"{key}=0,1,2"
            raise ConfigError(f"Config key '{key}' got {value!r}; allowed: {describe_range(spec, integer)}"
                              f"{' (each item)' if isinstance(value, list) else ''}. Give a value in that range, "
                              f"e.g. `{example}`{' (the default)' if not isinstance(default, list) else ''}.")


def _validate_privacy(pr: PrivacyConfig) -> None:
    """The privacy keys alone, beyond their ranges (:data:`RANGES`); what needs the strategy or the number of users (delta < 1 / users,
    a strategy that shares nothing, a reachable target epsilon) is checked by
    :func:`fedpeft.federation.privacy_checks.prepare_privacy` before Ray starts."""
    if pr.mechanism == "none":
        for key in ("target_epsilon", "max_epsilon"):
            _check(getattr(pr, key) == 0, f"privacy.{key}", getattr(pr, key),
                   "0 while privacy.mechanism=none (set privacy.mechanism=central, central_adaptive or client to use it)")


# ---- federation.availability and federation.speed: kind:params (fedpeft.federation.participation) ----
FORMS = {
    "federation.availability": {"const": 1, "uniform": 2, "beta": 2, "trace": 0},
    "federation.speed": {"const": 1, "lognormal": 1},
}
EXAMPLES = {"federation.availability": "const:1 (always online), const:0.5, uniform:0.2,0.8, beta:2,2 or trace:PATH.csv",
            "federation.speed": "const:1 (everyone alike) or lognormal:0.5 (speeds e^N(0, 0.5^2), median 1)"}


@dataclass(frozen=True)
class Spec:
    """A parsed ``kind:params`` value of ``federation.availability`` or ``federation.speed``."""

    kind: str
    params: tuple[float, ...] = ()
    path: str = ""


def parse_spec(key: str, value: str) -> Spec:
    """``const:1`` -> Spec("const", (1.0,)); ``trace:users.csv`` -> Spec("trace", path=...)."""
    kind, _, rest = str(value).strip().partition(":")
    forms = FORMS[key]
    if kind not in forms:
        raise ConfigError(f"{key}={value!r} is not a form fedpeft knows; use {EXAMPLES[key]}.")
    if kind == "trace":
        if not rest:
            raise ConfigError(f"{key}=trace needs a file: trace:PATH.csv (a row per user, a 0/1 column per round).")
        return Spec(kind, path=rest)
    try:
        params = tuple(float(x) for x in rest.split(",")) if rest else ()
    except ValueError:
        params = ()
    if len(params) != forms[kind] or not all(math.isfinite(p) for p in params):
        raise ConfigError(f"{key}={value!r}: {kind} takes {forms[kind]} number(s); use {EXAMPLES[key]}.")
    if kind == "const":
        bad = params[0] <= 0 or key == "federation.availability" and params[0] > 1
    elif kind == "uniform":
        bad = not 0 <= params[0] <= params[1] <= 1 or params[1] == 0
    else:  # beta: a, b > 0; lognormal: sigma >= 0
        bad = min(params) <= 0 if kind == "beta" else params[0] < 0
    if bad:
        allowed = {"const": "a probability in (0, 1]" if key == "federation.availability" else "a speed above 0",
                   "uniform": "0 <= lo <= hi <= 1, hi > 0", "beta": "a, b > 0", "lognormal": "sigma >= 0"}[kind]
        raise ConfigError(f"{key}={value!r} is out of range: {kind} takes {allowed}.")
    return Spec(kind, params)
