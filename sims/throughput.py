"""Throughput of fedpeft beside a plain loop, a FlowerTune-style client and pfl-research (issue 10).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python sims/throughput.py                  # MiniLM, 20 users, 3 x 4 steps
    HF_HUB_OFFLINE=1 PYTHONPATH=. python sims/throughput.py --model tiny --json throughput.json
    HF_HUB_OFFLINE=1 PYTHONPATH=. python sims/throughput.py --users 20,40,60 \
        --variants fedpeft-local_only-pack8,plain-local_only --repeat 2    # where start-up is paid back

The pfl-research variant needs Apple's simulator, a benchmark-only extra (never a dependency of
fedpeft): ``pip install -e '.[bench]'``. Without it that variant is skipped, with a message.

One workload, kept identical across variants: the same users and examples (read through
``fedpeft.data.get_benchmark(config).load_user(i)``), the same tokenised inputs (``input_length``
tokens, padded per batch to its longest row), the same backbone and adapter (LoRA with
``peft.*`` of the config, head trained, seeded as ``fedpeft.learning.models.build_model`` seeds it), R
rounds of S optimizer steps of B examples per user, the same batches in the same order (each
call's shuffle drawn from the seed of (seed, user, round), as fedpeft's clients draw it), a fresh
AdamW per call, and at the end every user's test and validation splits predicted once (fedpeft
scores both in every evaluation, since validation chooses the reported round; the reference loops
do the same work, and the table counts the examples each variant predicted). Each variant runs in
its own fresh interpreter, one after another:

- ``fedpeft-local_only`` / ``fedpeft-fedavg``: ``python -m fedpeft.sim`` (Flower on Ray, its
  default actors: ``ray.client_cpus=1``, one actor per core, one torch thread each);
- ``fedpeft-<strategy>-pack<k>``: the same with ``train.pack_users=k`` (cohort packing: each
  worker trains and scores up to k users in one forward pass);
- ``plain-local_only``: one process, all cores, data pre-tokenised once, one peft model built
  once, each user's adapter kept in a dict and swapped in with ``set_peft_model_state_dict``;
- ``plain-fedavg``: the same loop, the users' adapters averaged (example-weighted) every round;
- ``flowertune-local_only``: a client in FlowerTune's style, sequential in one process: every
  call (train and final evaluation) builds the model with ``from_pretrained`` + ``get_peft_model``
  and loads the user's adapter into it;
- ``pfl-fedavg``: the same FedAvg workload in pfl-research (``pfl.algorithm.FederatedAveraging``
  on ``pfl.aggregate.simulate.SimulatedBackend``, one ``pfl.model.pytorch.PyTorchModel`` in one
  process, cohort = all users, central SGD with lr 1 on the averaged update, which is FedAvg).

"Training" is the rounds (fedpeft: its ``results.json`` timings, the rounds minus the final
evaluation; it includes Flower's messages and each worker's first backbone build); "whole
process" is the subprocess's wall time from launch to exit (interpreter start, imports, model
loads, Ray, the final evaluation). Examples/s counts training examples (forward + backward) in
both; evaluation examples count the test and validation rows predicted at the end. Ratios are to
the plain loop of the same strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: fedpeft and sims/ from this checkout
    sys.path.insert(0, str(ROOT))

from fedpeft.config import Config  # noqa: E402
from sims.throughput_frameworks import IN_PROCESS, pfl_available  # noqa: E402
from sims.throughput_workload import build_workload  # noqa: E402

PACKED = tuple(f"fedpeft-{strategy}-pack{k}" for strategy in ("local_only", "fedavg") for k in (4, 8, 16))
VARIANTS = ("fedpeft-local_only", *PACKED[:3], "plain-local_only", "flowertune-local_only",
            "fedpeft-fedavg", PACKED[4], "plain-fedavg", "pfl-fedavg")
KNOWN = (*VARIANTS, *(v for v in PACKED if v not in VARIANTS))


def strategy_of(variant: str) -> str:
    """'fedpeft-fedavg-pack8' -> 'fedavg' (strategy names have no '-')."""
    return variant.split("-")[1]


def pack_of(variant: str) -> int:
    """train.pack_users of a fedpeft variant: 'fedpeft-fedavg-pack8' -> 8; 1 without '-pack'."""
    return int(variant.rsplit("-pack", 1)[1]) if "-pack" in variant else 1


# ---- the workload ------------------------------------------------------------------------------

def workload_overrides(args: argparse.Namespace, model: str) -> list[str]:
    """The fedpeft config keys of the workload: what every variant reads, and fedpeft.sim gets."""
    return [f"model.name={model}", f"data.num_users={args.users}", f"data.train_per_user={args.train_per_user}",
            f"data.val_per_user={args.val_per_user}", f"data.test_per_user={args.test_per_user}",
            f"federation.rounds={args.rounds}",
            f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
            f"seed={args.seed}"]


# ---- the driver: each variant in its own interpreter --------------------------------------------

def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "RAY_USAGE_STATS_ENABLED": "0", "WANDB_MODE": "disabled"}


def run_fedpeft(strategy: str, overrides: list[str], out: Path, pack: int = 1) -> dict:
    name = f"throughput-{strategy}-pack{pack}"
    cmd = [sys.executable, "-m", "fedpeft.sim", "--strategy", strategy, "--out", str(out), "--name", name,
           *overrides, f"train.pack_users={pack}",
           "federation.eval_every=1000000",  # the last round only: the final evaluation
           "output.progress=false", "wandb.mode=disabled"]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    whole = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"fedpeft {strategy} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out / name / "results.json").read_text())
    t = results["timings"]
    return {"whole_s": whole, "train_s": sum(t["rounds_s"]) - t["final_eval_s"], "eval_s": t["final_eval_s"],
            "before_round1_s": t["run_started_at"] + t["discovery_s"] - launched,
            "examples": results["compute"]["examples_processed_total"],
            "eval_examples": fedpeft_eval_examples(out / name, results["rounds"]),
            "accuracy": results["summary"]["accuracy"],
            "model_builds": 1 + sum(results["workers"].values()) if results.get("workers") else None}


def fedpeft_eval_examples(run_dir: Path, final_round: int) -> int:
    """The rows a fedpeft run predicted in its final evaluation: each user's test and validation
    examples, as its ``rounds_per_user.jsonl`` records them for the last round."""
    rows = [json.loads(line) for line in (run_dir / "rounds_per_user.jsonl").read_text().splitlines()]
    return sum(r["n_test"] + r["n_val"] for r in rows if r["round"] == final_round)


def run_subprocess(variant: str, args: argparse.Namespace, model: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-variant", variant, "--result-file", str(result_file),
           "--model", model, "--users", str(args.users), "--train-per-user", str(args.train_per_user),
           "--val-per-user", str(args.val_per_user), "--test-per-user", str(args.test_per_user),
           "--rounds", str(args.rounds), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads)]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True)
    whole = time.time() - launched
    try:
        if proc.returncode != 0:
            raise RuntimeError(f"{variant} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return {"whole_s": whole, **json.loads(result_file.read_text())}
    finally:
        result_file.unlink(missing_ok=True)


def ratio(base: dict | None, r: dict) -> str:
    """How much faster ``r`` ran than ``base``: whole process / training (> 1: faster)."""
    return f"{base['whole_s'] / r['whole_s']:.2f}x / {base['train_s'] / r['train_s']:.2f}x" if base else "—"


def table(rows: list[dict], expected: int, expected_eval: int) -> str:
    by_name = {r["variant"]: r for r in rows}
    lines = ["| variant | whole process | training | final eval | training examples | evaluation examples "
             "| examples/s whole | examples/s training | ratio to plain (whole / training) "
             "| ratio to fedpeft per-user (whole / training) | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    for r in rows:
        strategy = strategy_of(r["variant"])
        per_user = by_name.get(f"fedpeft-{strategy}") if pack_of(r["variant"]) > 1 else None
        flag = "" if r["examples"] == expected else f" (expected {expected})"
        eval_flag = "" if r["eval_examples"] == expected_eval else f" (expected {expected_eval})"
        lines.append(f"| {r['variant']} | {r['whole_s']:.1f} s | {r['train_s']:.1f} s | {r['eval_s']:.1f} s | "
                     f"{r['examples']:,}{flag} | {r['eval_examples']:,}{eval_flag} | "
                     f"{r['examples'] / r['whole_s']:.1f} | {r['examples'] / r['train_s']:.1f} | "
                     f"{ratio(by_name.get(f'plain-{strategy}'), r)} | {ratio(per_user, r)} | {r['accuracy']:.4f} |")
    if "fedpeft-fedavg" in by_name and "pfl-fedavg" in by_name:
        f, p = by_name["fedpeft-fedavg"], by_name["pfl-fedavg"]
        lines.append("")
        lines.append(f"fedpeft-fedavg vs pfl-fedavg throughput: {p['whole_s'] / f['whole_s']:.2f}x whole process, "
                     f"{p['train_s'] / f['train_s']:.2f}x training (> 1: fedpeft is faster)")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default="minilm", help="backbone: 'minilm' (the embedded default), 'tiny' (a "
                    "2-layer random BERT built in a temporary folder) or a local folder")
    ap.add_argument("--users", default="20", help="synthetic users (data.num_users); a comma list (20,40,60) runs "
                    "the comparison at each size and ends with the ratios by size")
    ap.add_argument("--train-per-user", type=int, default=16, help="training examples per user")
    ap.add_argument("--val-per-user", type=int, default=Config().data.val_per_user,
                    help="validation examples per user, predicted once at the end with the test examples "
                    "(fedpeft scores both in every evaluation)")
    ap.add_argument("--test-per-user", type=int, default=24, help="test examples per user, predicted once at the end")
    ap.add_argument("--rounds", type=int, default=3, help="rounds: every user trains once per round")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per user per round (train.steps)")
    ap.add_argument("--batch-size", type=int, default=8, help="examples per step (train.batch_size)")
    ap.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (train.lr)")
    ap.add_argument("--seed", type=int, default=0, help="model seed (fedpeft's seed)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="torch threads of the one-process variants (fedpeft's actors keep ray.client_cpus)")
    ap.add_argument("--repeat", type=int, default=1, help="run the variants this many times, interleaved; "
                    "the table shows each variant's median (a shared machine is noisy)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list, run in this order; known: {', '.join(KNOWN)}")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--run-variant", help=argparse.SUPPRESS)  # internal: run one in-process variant
    ap.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.run_variant:  # inside a variant's own interpreter
        torch.set_num_threads(args.threads)
        work = build_workload(workload_overrides(args, args.model))
        result = IN_PROCESS[args.run_variant](work)
        args.result_file.write_text(json.dumps(result))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in KNOWN]
    if unknown:
        print(f"unknown variants {unknown}; known: {', '.join(KNOWN)}", file=sys.stderr)
        return 2
    why = pfl_available()
    if why and "pfl-fedavg" in variants:
        print(f"skipping pfl-fedavg: pfl-research does not import here ({why}); pip install -e '.[bench]'",
              file=sys.stderr)
        variants.remove("pfl-fedavg")
    sizes = users_list(args.users)
    results = []  # (users, medians, rows, expected, expected_eval) per workload size
    with tempfile.TemporaryDirectory(prefix="fedpeft-throughput-") as tmp:
        model = args.model
        if model == "tiny":
            from fedpeft.testing import save_tiny_bert

            model = str(save_tiny_bert(Path(tmp) / "tiny-bert"))
        for users in sizes:
            size_args = argparse.Namespace(**{**vars(args), "users": users})
            results.append((users, *compare(size_args, variants, model, Path(tmp) / f"users-{users}")))
    for users, medians, _rows, expected, expected_eval in results:
        if len(sizes) > 1:
            print(f"\n{users} users ({expected:,} training examples)")
        if args.repeat > 1:
            print(f"medians of {args.repeat} repeats")
        print(table(medians, expected, expected_eval))
    if len(sizes) > 1 and any(not v.startswith("plain-") for v in variants):
        print("\nby workload size (ratio to the plain loop of the same strategy, whole process / training; > 1: faster)")
        print(scale_table([(users, medians, expected) for users, medians, _, expected, _ in results]))
    if args.json:
        runs = [{"users": users, "expected_examples": expected, "expected_eval_examples": expected_eval,
                 "medians": medians, "rows": rows} for users, medians, rows, expected, expected_eval in results]
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, **runs[0]} if len(runs) == 1 else \
            {"args": {k: str(v) for k, v in vars(args).items()}, "sizes": runs}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


def users_list(text: str) -> list[int]:
    """``--users``: one size, or a comma list of sizes."""
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise SystemExit(f"--users got {text!r}; give a number of users, or a comma list such as 20,40,60")
    return sizes


def compare(args: argparse.Namespace, variants: list[str], model: str, tmp: Path) -> tuple[list[dict], list[dict], int, int]:
    """The variants on the workload of ``args``, each repeat interleaved: (each variant's median
    row, every row, training examples expected, evaluation examples expected)."""
    overrides = workload_overrides(args, model)
    work = build_workload(overrides)
    expected, expected_eval = work.training_examples(), work.eval_examples()
    print(f"workload: {args.users} users x {args.rounds} rounds x {args.steps} steps x {args.batch_size} examples "
          f"= {expected:,} training examples, {expected_eval:,} evaluation examples (test + validation); "
          f"model {args.model}", file=sys.stderr, flush=True)
    rows = []
    for repeat in range(args.repeat):  # variants interleaved: a busy spell hits all of them
        for variant in variants:
            if variant.startswith("fedpeft-"):
                row = run_fedpeft(strategy_of(variant), overrides, tmp / f"runs-{repeat}", pack_of(variant))
            else:
                row = run_subprocess(variant, args, model)
            rows.append({"variant": variant, "repeat": repeat, **row})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    medians = [median_row([r for r in rows if r["variant"] == v]) for v in variants]
    return medians, rows, expected, expected_eval


def scale_table(sizes: list[tuple[int, list[dict], int]]) -> str:
    """Each variant's ratio to the plain loop of its strategy, whole process / training, one row
    per workload size: where fedpeft's fixed start-up is paid back by faster training."""
    compared = [m["variant"] for m in sizes[0][1] if not m["variant"].startswith("plain-")]
    lines = ["| users | training examples | " + " | ".join(compared) + " |", "|---|---|" + "---|" * len(compared)]
    for users, medians, expected in sizes:
        by_name = {m["variant"]: m for m in medians}
        cells = [ratio(by_name.get(f"plain-{strategy_of(v)}"), by_name[v]) for v in compared]
        lines.append(f"| {users} | {expected:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def median_row(rows: list[dict]) -> dict:
    """One variant's repeats: the median of each timing, the rest from the first repeat."""
    out = dict(rows[0])
    for key in ("whole_s", "train_s", "eval_s", "before_round1_s"):
        if key in out:
            out[key] = float(np.median([r[key] for r in rows]))
    return out


if __name__ == "__main__":
    sys.exit(main())
