"""Studies that are checked before they start, stop cleanly and resume: the main of sims/compare.py,
sims/where_sharing_pays.py and sims/privacy.py.

A new study checks every one of its runs before the first starts (fedpeft.launch.run_checks: whatever
``python -m fedpeft.sim`` would refuse before its simulation) and refuses with one line per
misfit; then it records its own arguments in ``STUDY_DIR/study.json`` (the resolved config and
the study's other options), so that

- ``--resume STUDY_DIR`` needs nothing else: finished runs (a run folder with results.json) are
  kept, interrupted ones (run.json, no results.json) are continued as ``python -m fedpeft.sim
  --resume RUN_DIR`` does, missing ones run, and the report is rebuilt. Other arguments given with
  it may change only what does not change results (fedpeft.federation.checkpoint.RESUME_MAY_CHANGE); any
  other difference from study.json is refused, naming it;
- ``--report-only STUDY_DIR`` rebuilds the tables and plots from the runs there, without compute:
  a run missing or unfinished is listed as such (a failed run in the tables, its reason saying
  which).

One Ctrl-C (SIGINT; or SIGTERM) stops the study as it stops a single run: Ray is shut down, one
line says where it stopped and the command that continues it, exit 130 (143). Without this, a
KeyboardInterrupt left the study at interpreter exit waiting for Flower's ServerApp thread (not a
daemon), which waits for replies from the actors the shutdown ended for up to its no-reply timeout
(1.2 x federation.call_timeout + 120 s).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.federation.checkpoint import (
    RESUME_MAY_CHANGE,
    RUN_FILE,
    Checkpoint,
    flat,
    resume_config,
)
from fedpeft.files import read_json_fields
from fedpeft.study.status import RunNotFinished

STUDY_FILE = "study.json"
FRESH, RESUME, REPORT = "fresh", "resume", "report-only"
MODE_FLAGS = {"--resume": RESUME, "--report-only": REPORT}
FINISHED, INTERRUPTED, MISSING = "finished", "interrupted", "missing"
Runner = Callable[..., dict[str, Any]]  # (config, resume=False) -> results, as fedpeft.sim.run


@dataclass
class StudyPlan:
    """A study parsed from its arguments: its config (``compare.*`` included), its folder
    (``--compare-out``; None: the default), its options that are no config keys (``{"--epsilons":
    "inf,4"}``, recorded as given), ``run(folder, runner)``, which runs it into ``folder`` and
    returns it, and ``runs(folder)``, every run's config in the order ``run`` runs them."""

    config: Config
    out: Path | None
    arguments: dict[str, str]
    run: Callable[[Path, Runner], Path]
    runs: Callable[[Path], list[Config]]


@dataclass(frozen=True)
class StudySpec:
    """A study script: its path (as the user types it), the table it prints, what it writes, the
    prefix of its default folder and how it parses its arguments into a :class:`StudyPlan`."""

    script: str
    table: str
    what: str
    prefix: str
    plan: Callable[[list[str]], StudyPlan]


@dataclass
class _Progress:
    """Where the study is, for the line a signal prints."""

    study: Path | None = None
    run: Path | None = None
    mode: str = FRESH


PROGRESS = _Progress()


def split_mode(argv: list[str]) -> tuple[str, Path | None, list[str]]:
    """(fresh / resume / report-only, STUDY_DIR, the other arguments) of a study's command line."""
    found: list[tuple[str, str]] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if flag in MODE_FLAGS:
            if not value:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    raise ConfigError(f"{flag} needs the study's folder: {flag} STUDY_DIR")
                value, i = argv[i + 1], i + 1
            found.append((flag, value))
        else:
            rest.append(argv[i])
        i += 1
    if len(found) > 1:
        raise ConfigError(f"Give one of --resume STUDY_DIR and --report-only STUDY_DIR, once (got {' '.join(f for f, _ in found)}).")
    if not found:
        return FRESH, None, rest
    flag, value = found[0]
    if any(a.split("=", 1)[0] in ("--compare-out", "compare.out") for a in rest):
        raise ConfigError(f"{flag} {value} works in that folder: leave --compare-out out.")
    return MODE_FLAGS[flag], Path(value).expanduser().resolve(), rest


# ---- the study's record -------------------------------------------------------------------------
def check_new_folder(out: Path) -> None:
    """Refuse a study folder that is a file (or lies under one), holds a study already, or holds
    anything else (a fresh study writes into a new or empty folder)."""
    blocker = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocker == out:
        raise ConfigError(f"--compare-out {out} is a file, not a folder. Give a folder for the study (a new or an empty one).")
    if blocker is not None:
        raise ConfigError(f"--compare-out {out} cannot be created: {blocker} is a file, not a folder. Give another folder.")
    if (out / STUDY_FILE).is_file():
        raise ConfigError(f"{out} holds a study already ({STUDY_FILE}). Continue it with --resume {out}, rebuild its "
                          f"report with --report-only {out}, or give another --compare-out.")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"--compare-out {out} is not empty and holds no study ({STUDY_FILE}). Give a new or an empty folder.")


def write_record(out: Path, spec: StudySpec, plan: StudyPlan, argv: list[str]) -> None:
    """STUDY_DIR/study.json: everything --resume needs, written before the first run starts."""
    from fedpeft.files import atomic_write_text

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"Cannot create the study folder {out}: {err.strerror or err}. Give --compare-out a folder "
                          "this user can create and write to.") from None
    record = {"study": spec.script, "command": shlex.join(["python", spec.script, *argv]),
              "started": datetime.now().astimezone().isoformat(timespec="seconds"),
              "config": plan.config.to_dict(), "arguments": plan.arguments}
    atomic_write_text(out / STUDY_FILE, json.dumps(record, indent=1) + "\n")


def read_record(spec: StudySpec, study: Path, flag: str) -> dict[str, Any]:
    path = study / STUDY_FILE
    try:
        record = read_json_fields(
            path, ("config", "arguments", "study"),
            f"{flag} {study}: no {STUDY_FILE} there, so it is not a study folder (or one from before studies could "
            "resume). Give the folder a study was started in.",
            lambda err: f"{path} cannot be read ({type(err).__name__}: {err}); it was not written by a fedpeft study, "
                        "or it was damaged.")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err)) from None
    if record["study"] != spec.script:
        raise ConfigError(f"{study} is a study of {record['study']}, not of {spec.script}: use python {record['study']} "
                          f"{flag} {study}")
    return {"config": record["config"], "arguments": record["arguments"]}


def recorded_plan(spec: StudySpec, study: Path, flag: str, rest: list[str]) -> StudyPlan:
    """The study's plan from its study.json, with ``rest`` on top; refused when ``rest`` changes
    anything but :data:`RESUME_MAY_CHANGE`, naming each difference."""
    import yaml

    record = read_record(spec, study, flag)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="study-config-") as file:
        yaml.safe_dump(record["config"], file)
        file.flush()
        arguments = [part for key, value in record["arguments"].items() for part in (key, str(value))]
        plan = spec.plan(["--config", file.name, *arguments, *rest])
    now = flat(plan.config)
    differ = [f"{k} ({v!r} -> {now.get(k)!r})" for k, v in flat(Config.from_dict(record["config"])).items()
              if v != now.get(k) and k not in RESUME_MAY_CHANGE]
    differ += [f"{k} ({v!r} -> {plan.arguments.get(k)!r})" for k, v in record["arguments"].items() if plan.arguments.get(k) != v]
    if differ:
        raise ConfigError(f"{flag} {study} continues the study as it was started ({study / STUDY_FILE}), but these "
                          f"differ: {', '.join(differ)}. Drop those arguments, or start a new study with another "
                          f"--compare-out. Keys that may change: {', '.join(RESUME_MAY_CHANGE)}.")
    return plan


# ---- the runs ------------------------------------------------------------------------------------
def run_folder(cfg: Config) -> Path:
    return Path(cfg.output.dir) / cfg.output.name


def run_state(folder: Path) -> str:
    """finished (results.json), interrupted (run.json: it started) or missing."""
    if (folder / "results.json").is_file():
        return FINISHED
    return INTERRUPTED if (folder / RUN_FILE).is_file() else MISSING


def total_rounds(cfg: Config) -> int:
    from fedpeft.strategies import make_strategy

    return sum(p.rounds for p in make_strategy(cfg).phases())


def finished_results(folder: Path) -> dict[str, Any]:
    from fedpeft.files import json_value

    try:
        return json_value((folder / "results.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{folder / 'results.json'} cannot be read ({err}); move the run folder aside and --resume "
                          "the study again to run it anew.") from None


def tracked(runner: Runner) -> Runner:
    """``runner``, noting which run is under way (for the line a signal prints)."""
    def run(cfg: Config, *args: Any) -> dict[str, Any]:
        PROGRESS.run = run_folder(cfg)
        try:
            results = runner(cfg, *args)
        except Exception:  # the run failed (the study goes on); a signal (BaseException) leaves it named
            PROGRESS.run = None
            raise
        PROGRESS.run = None
        return results

    return run


def resuming(runner: Runner) -> Runner:
    """--resume: a finished run is read back, an interrupted one continued from its last completed
    round with its own config (as ``python -m fedpeft.sim --resume RUN_DIR``; the keys of
    RESUME_MAY_CHANGE as the study now sets them), a missing one run."""
    def run(cfg: Config) -> dict[str, Any]:
        folder = run_folder(cfg)
        state = run_state(folder)
        if state == FINISHED:
            print(f"{folder.name}: finished before; kept (its results.json)", flush=True)
            return finished_results(folder)
        if state == INTERRUPTED and (folder / "config.yaml").is_file():
            now = flat(cfg)
            print(f"{folder.name}: interrupted after round {Checkpoint.saved_round(folder)}; resuming it", flush=True)
            return runner(resume_config(folder, [], [(k, now[k]) for k in RESUME_MAY_CHANGE]), True)
        if state == INTERRUPTED:  # stopped before its first round: nothing computed, its config is the study's
            return runner(cfg, True)
        return runner(cfg)

    return run


def reading(cfg: Config) -> dict[str, Any]:
    """--report-only's runner: a finished run's results; a missing or unfinished run raises
    :class:`RunNotFinished`, saying which."""
    folder = run_folder(cfg)
    state = run_state(folder)
    if state == FINISHED:
        return finished_results(folder)
    if state == MISSING:
        raise RunNotFinished("missing: not run yet")
    raise RunNotFinished(f"unfinished: stopped after round {Checkpoint.saved_round(folder)} of {total_rounds(cfg)}")


# ---- the main ------------------------------------------------------------------------------------
def run_study(spec: StudySpec, argv: list[str], runner: Runner) -> Path:
    """Check, record and run a new study; or continue one (--resume); or rebuild its report
    (--report-only). Returns its folder."""
    from fedpeft.launch.ray_start import SharedRay
    from fedpeft.launch.run_checks import check_study_runs

    mode, study, rest = split_mode(argv)
    PROGRESS.study, PROGRESS.run, PROGRESS.mode = None, None, mode
    if mode == FRESH:
        plan = spec.plan(rest)
        study = (plan.out or Path(plan.config.output.dir) / f"{spec.prefix}-{datetime.now():%Y%m%d-%H%M%S}").resolve()
        check_new_folder(study)
        check_study_runs(plan.runs(study), study)  # every run, before any starts
        write_record(study, spec, plan, argv)
        PROGRESS.study = study
        with SharedRay():  # one Ray, and warm client actors, for all the study's runs
            return plan.run(study, tracked(runner))
    assert study is not None
    flag = next(f for f, m in MODE_FLAGS.items() if m == mode)
    plan = recorded_plan(spec, study, flag, rest)
    PROGRESS.study = study
    if mode == REPORT:
        folder = plan.run(study, reading)
        not_run = {str(run_folder(c).relative_to(study)): run_state(run_folder(c)) for c in plan.runs(study)
                   if run_state(run_folder(c)) != FINISHED}
        if not_run:
            print(f"fedpeft: {len(not_run)} run(s) not finished, reported as not run: "
                  f"{', '.join(f'{k} ({v})' for k, v in not_run.items())}; continue with "
                  f"`{continue_command(spec, study)}`", file=sys.stderr)
        return folder
    check_study_runs([c for c in plan.runs(study) if run_state(run_folder(c)) != FINISHED], study)
    with SharedRay():
        return plan.run(study, tracked(resuming(runner)))


def continue_command(spec: StudySpec, study: Path) -> str:
    return f"python {spec.script} --resume {shlex.quote(str(study))}"


def interrupted_line(spec: StudySpec) -> str:
    """The one line a signal prints: where the study stopped and how to continue it."""
    study = PROGRESS.study
    if study is None or not (study / STUDY_FILE).is_file():
        return "fedpeft: interrupted before the study started; nothing to continue"
    if PROGRESS.mode == REPORT:
        return f"fedpeft: interrupted while rebuilding the report; rebuild it with `python {spec.script} --report-only {shlex.quote(str(study))}`"
    where = ""
    if PROGRESS.run is not None:
        name = os.path.relpath(PROGRESS.run, study)
        where = f" in run {name} after its round {Checkpoint.saved_round(PROGRESS.run)}"
    return f"fedpeft: interrupted{where}; continue the study with `{continue_command(spec, study)}`"


def study_main(spec: StudySpec, argv: list[str]) -> int:
    """A study script's main: runs it (fedpeft.sim.run for each run) and prints its table; a bad
    argument or a misfit is one error (exit 2); a signal stops it (exit 130 / 143)."""
    import fedpeft.sim as sim
    from fedpeft.launch.signals import Interrupted, finish_wandb, stop_on_signals

    try:
        with stop_on_signals():
            folder = run_study(spec, argv, sim.run)
    except Interrupted as stop:  # end without waiting for Flower's ServerApp thread (Ray goes with the process)
        print(interrupted_line(spec), file=sys.stderr)
        finish_wandb(stop.exit_code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(stop.exit_code)
    except ConfigError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    print((folder / spec.table).read_text())
    print(f"{spec.what} written to {folder}")
    return 0
