"""Command line of ``python -m fedpeft.sim``: flags, dotted overrides, and --help from the schema."""

from __future__ import annotations

import argparse

from fedpeft.config import FLAG_ALIASES, Config, ConfigError
from fedpeft.config_checks import iter_fields
from fedpeft.config_load import build_config, parse_override
from fedpeft.federation.checkpoint import RESUME_MAY_CHANGE, resume_config
from fedpeft.launch.assemble import apply_sweep_parameters, check_names

DESCRIPTION = """\
Simulate federated personalization: every user of a benchmark is a Flower client on Ray that
keeps a private PEFT adapter; the strategy decides which adapter keys are shared and aggregated.

Config layers: schema defaults < configs/default.yaml < --config FILE(s) < flags and overrides.
Any key below can also be given as KEY=VALUE (e.g. train.lr=1e-4) or --KEY=VALUE (W&B sweeps)."""
DEBUG_FLAG = "--debug"  # how errors print, not what runs: a flag of the command line, no config key


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedpeft.sim", description=DESCRIPTION,
        usage="python -m fedpeft.sim [--strategy NAME] [--config FILE] [options] [KEY=VALUE ...]", allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config file; repeat to layer several")
    parser.add_argument("--resume", default="", metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last completed round, with its own config; only "
                             f"keys that do not change results may be set differently ({', '.join(RESUME_MAY_CHANGE)})")
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on an error, print its traceback (and the error it came from, e.g. what a plug-in "
                             "module raised on import) above the one-line message")
    fields = {key: (default, help_) for key, _, default, help_ in iter_fields()}
    common = parser.add_argument_group("common options")
    for flag, key in FLAG_ALIASES.items():
        default, help_ = fields[key]
        common.add_argument(f"--{flag}", dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                            help=f"{help_} [{key}] (default: {default!r})")
    every = parser.add_argument_group("all config keys (also as KEY=VALUE)")
    for key, (default, help_) in fields.items():
        if key in FLAG_ALIASES:  # already a common flag of the same name
            continue
        every.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, metavar="VALUE",
                           help=f"{help_} (default: {default!r})")
    return parser


def config_from_args(argv: list[str]) -> Config:
    """Parse ``argv`` into a validated Config; raises ConfigError on any unknown key or bad value."""
    if any(a == "--resume" or a.startswith("--resume=") for a in argv):
        raise ConfigError("--resume RUN_DIR is an option of `python -m fedpeft.sim` only.")
    if DEBUG_FLAG in argv:
        raise ConfigError(f"{DEBUG_FLAG} is an option of `python -m fedpeft.sim` only.")
    return sim_args(argv)[0]


def sim_args(argv: list[str]) -> tuple[Config, bool]:
    """``python -m fedpeft.sim``'s arguments: the validated Config, and whether it continues a run
    folder (``--resume RUN_DIR``: that folder's config with the given keys on top)."""
    positional = [a for a in argv if "=" in a and not a.startswith("-")]
    rest = [a for a in argv if a not in positional]
    args, unknown = build_parser().parse_known_args(rest)
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(unknown):  # unknown --key=value / --key value: reported with the closest valid key
        token = unknown[i]
        if not token.startswith("--"):
            raise ConfigError(f"Unexpected argument '{token}'. Give overrides as KEY=VALUE, e.g. train.lr=1e-4.")
        if "=" in token:
            overrides.append(parse_override(token))
        else:
            value = unknown[i + 1] if i + 1 < len(unknown) else ""
            overrides.append((token[2:], value))
            i += 1
        i += 1
    flags = [(k, v) for k, v in vars(args).items() if k not in ("config", "resume", "debug")]
    settings = flags + overrides + [parse_override(a) for a in positional]
    if args.resume:
        return check_names(resume_config(args.resume, args.config, settings)), True
    return check_names(apply_sweep_parameters(build_config(args.config, settings))), False
