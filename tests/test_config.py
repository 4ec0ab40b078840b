from pathlib import Path

import pytest
import yaml

from fedpeft.cli import build_parser, config_from_args
from fedpeft.config import Config, ConfigError, all_keys
from fedpeft.config_checks import iter_fields
from fedpeft.config_load import REPO_DEFAULT_YAML, build_config
from fedpeft.launch.ray_start import check_ray_address
from fedpeft.sim import main


def test_default_yaml_matches_schema():
    assert yaml.safe_load(REPO_DEFAULT_YAML.read_text()) == Config().to_dict()


def test_both_override_forms_and_flags():
    cfg = config_from_args(["--strategy", "local_only", "train.lr=1e-4", "--train.batch_size=4",
                            "--rounds", "3", "--data.noise", "0.25", "wandb.tags=a,b", "--seed=7"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.train.batch_size == 4
    assert cfg.federation.rounds == 3
    assert cfg.data.noise == pytest.approx(0.25)
    assert cfg.wandb.tags == ["a", "b"]
    assert cfg.seed == 7


def test_value_split_on_first_equals():
    cfg = config_from_args(["wandb.name=a=b"])
    assert cfg.wandb.name == "a=b"


def test_config_file_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("federation:\n  rounds: 9\ntrain:\n  lr: 0.5\n")
    cfg = config_from_args(["--config", str(f), "train.lr=0.25"])
    assert cfg.federation.rounds == 9  # from the file
    assert cfg.train.lr == 0.25  # the override wins


@pytest.mark.parametrize(
    "args, needles",
    [
        (["train.lrr=1"], ["train.lrr", "train.lr"]),
        (["--federation.roundz=3"], ["federation.roundz", "federation.rounds"]),
        (["--rounds", "abc"], ["federation.rounds", "'abc'", "int"]),
        (["--rounds", "0"], ["federation.rounds", "0", ">= 1"]),
        (["federation.cohort_fraction=1.5"], ["cohort_fraction", "1.5", "(0, 1]"]),
        (["federation.cohort_fraction=0"], ["cohort_fraction", "(0, 1]"]),
        (["--strategy", "fedfoo"], ["fedfoo", "local_only"]),
        (["--benchmark", "nope"], ["nope", "synthetic"]),
        (["--wandb", "sometimes"], ["wandb.mode", "offline"]),
        (["train"], ["Unexpected argument"]),
    ],
)
def test_bad_input_names_key_value_and_allowed(args, needles):
    with pytest.raises(ConfigError) as err:
        config_from_args(args)
    for needle in needles:
        assert needle in str(err.value)


def test_bad_yaml_key_names_the_file(tmp_path: Path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate.*bad.yaml"):
        build_config([str(f)])


def test_help_lists_every_key_with_default():
    text = build_parser().format_help()
    for key in all_keys():
        assert key in text, key
    assert "(default: 'local_only')" in text
    assert "(default: 8)" in text


def test_main_rejects_before_ray_starts(capsys):
    import ray

    assert main(["--rounds", "0"]) == 2
    assert "federation.rounds" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_missing_model_path_is_a_clear_error(capsys, tmp_path: Path):
    import ray

    assert main(["--model", str(tmp_path / "no-such-model"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "minilm" in err
    assert not ray.is_initialized()


def test_unreachable_ray_cluster_fails_fast():
    with pytest.raises(ConfigError, match="No Ray cluster answers"):
        check_ray_address("127.0.0.1:1")


def test_wandb_online_without_a_key_stops_before_ray_starts(capsys, tmp_path: Path, monkeypatch):
    """Before: W&B online with no key ended as "the simulation ended without results"."""
    import ray

    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert main(["--wandb", "online", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--wandb offline" in err and "WANDB_API_KEY" in err
    assert not ray.is_initialized() and not list(tmp_path.glob("local_only-*"))  # nothing started, no run folder


def test_resume_is_refused_outside_the_entry_point():
    with pytest.raises(ConfigError, match="--resume RUN_DIR is an option of `python -m fedpeft.sim`"):
        config_from_args(["--resume", "runs/x"])


def test_config_is_a_leaf_of_fedpeft():
    """config.py imports nothing of fedpeft, not even inside a function: the name checks live
    where a run's config is assembled (fedpeft.launch.assemble)."""
    import ast
    import subprocess
    import sys

    import fedpeft.config

    tree = ast.parse(Path(fedpeft.config.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if m.split(".")[0] in ("fedpeft", "strategies")], imported
    code = ("import sys; from fedpeft.config_load import build_config; build_config(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fedpeft', 'strategies')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['fedpeft', 'fedpeft.config', 'fedpeft.config_checks', 'fedpeft.config_load']"


# ----------------------------------------------------------------------------- number ranges


@pytest.mark.parametrize("override, key", [("--seed=-1", "seed"), ("data.seed=-1", "data.seed"),
                                           ("train.weight_decay=-5", "train.weight_decay")])
def test_negative_seeds_and_weight_decay_are_refused_in_one_line(override, key, capsys):
    """Before: seed=-1 and weight_decay=-5 passed (every training call then failed and the run
    exited 0 with an untrained headline); data.seed=-1 ended in a numpy traceback."""
    with pytest.raises(ConfigError) as err:
        config_from_args([override])
    message = str(err.value)
    assert "\n" not in message and f"'{key}' got -" in message, message
    assert ("a number >= 0" if key == "train.weight_decay" else "an integer in [0, 4294967295]") in message, message
    assert main([override]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed.splitlines() == [f"fedpeft: error: {message}"]


def _numeric_keys() -> dict[str, type]:
    import typing

    numbers = (int, float)
    return {key: kind for key, kind, *_ in iter_fields()
            if kind in numbers or (typing.get_origin(kind) is list and typing.get_args(kind)[0] in numbers)}


def test_every_number_key_has_a_range_and_help_shows_it():
    from fedpeft.config_checks import RANGES

    numeric = _numeric_keys()
    assert set(RANGES) == set(numeric)  # every number key, and only those
    helps = {action.dest: action.help for action in build_parser()._actions}
    for key, spec in RANGES.items():
        assert f"[range: {spec}]" in helps[key], key


def test_each_range_refuses_just_outside_its_bounds_and_takes_its_bounds():
    """Against a plain reading of each range: a closed bound is accepted, an open one refused,
    and a value one step beyond a bound (1 for integers, 1e-6 for numbers) refused."""
    from fedpeft.config_checks import RANGES

    numeric = _numeric_keys()
    for key, spec in RANGES.items():
        if " or " in spec:
            continue  # data.max_length: 0 or >= 8, below
        is_int = numeric[key] is int or numeric[key] == list[int]
        step = 1 if is_int else 1e-6
        low, high = (x.strip() for x in spec[1:-1].split(","))
        cases = []
        if low != "-inf":
            cases += [(float(low), spec[0] == "["), (float(low) - step, False)]
        if high != "inf":
            cases += [(float(high), spec[-1] == "]"), (float(high) + step, False)]
        for value, accepted in cases:
            text = str(int(value)) if is_int else repr(value)
            overrides = [(key, text)]
            if key == "data.train_per_user_min":
                overrides.append(("data.train_per_user", str(max(int(value), 1))))
            if key == "train.epochs":
                overrides.append(("train.steps", "1"))
            try:
                build_config(overrides=overrides)
                ok = True
            except ConfigError as err:
                ok = False
                assert f"'{key}'" in str(err), (key, str(err))
            assert ok == accepted, (key, text)
    for value, accepted in (("0", True), ("7", False), ("8", True), ("-1", False)):
        try:
            build_config(overrides=[("data.max_length", value)])
            ok = True
        except ConfigError:
            ok = False
        assert ok == accepted, value


# ----------------------------------------------------------------------------- data.new_users (issue 29, item 7)

@pytest.mark.parametrize("value, users, expected", [
    ("0", 10, 0), ("0.0", 10, 0), ("0.2", 10, 2), ("0.04", 10, 1),  # a fraction: rounded, at least 1
    ("count:1", 10, 1), ("count:4", 10, 4), ("4", 10, 4), ("4.0", 10, 4),  # a count; a whole number >= 2 too
])
def test_new_users_is_a_fraction_below_one_or_a_count(value, users, expected):
    from fedpeft.data.user_groups import new_user_indices

    config = config_from_args([f"data.new_users={value}"])
    held_out = new_user_indices(config, users)
    assert len(held_out) == expected and len(set(held_out)) == expected and all(0 <= i < users for i in held_out)


@pytest.mark.parametrize("value", ["1", "1.0", "1e0"])
def test_new_users_of_exactly_one_is_refused_saying_how_to_write_each(value, tiny_bert, tmp_path, capsys, monkeypatch):
    """Before: 1.0 meant one user (a count), though read as a fraction it is every user."""
    from tests.conftest import tiny_args
    from tests.test_data_checks import refuse_ray

    refuse_ray(monkeypatch)
    assert main(tiny_args(tiny_bert, tmp_path, "one", f"data.new_users={value}")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"'data.new_users' got '{value}', which could mean one user or all of them" in err
    assert "count:1 for one user" in err and "a fraction in (0, 1) such as 0.2" in err


@pytest.mark.parametrize("value", ["1.5", "-0.2", "count:0", "count:2.5", "count:", "two", "nan", "inf"])
def test_other_new_users_values_are_refused_naming_the_forms(value):
    with pytest.raises(ConfigError) as err:
        config_from_args([f"data.new_users={value}"])
    assert f"got '{value}'" in str(err.value) and "count:N such as count:4" in str(err.value)
    assert "a fraction in (0, 1)" in str(err.value)


def test_help_says_how_to_write_new_users():
    helps = {action.dest: action.help for action in build_parser()._actions}
    assert "count:N" in helps["data.new_users"] and "fraction in (0, 1)" in helps["data.new_users"]
    assert "1 is refused" in helps["data.new_users"]
