"""Benchmark data commands.

    python -m fedpeft.data prepare peft-u --task tweeteval --raw DIR --out DIR
    python -m fedpeft.data prepare peft-u --task measuringhatespeech [--raw DIR] --out DIR
    python -m fedpeft.data download lamp --task LaMP-2 --split user --out DIR [--base-url URL]

``prepare peft-u`` turns PEFT-U's raw files into its prepared per-user form with PEFT-U's split,
for any of its 13 tasks (see fedpeft.data.peft_u and fedpeft.data.peft_u_tasks); set ``data.path``
to the output folder. A run reads that file's per-user splits with ``data.split=leaked``; the
default ``data.split=by_text`` re-splits its examples by text when it loads them (PEFT-U's
no-leak split, seeded by ``data.seed``). ``download lamp`` fetches LaMP's official question/output files (see
fedpeft.data.lamp); set ``data.path`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys

from fedpeft.config import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedpeft.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare", help="convert raw benchmark files into the prepared per-user form")
    prep_sub = prep.add_subparsers(dest="family", required=True)
    pu = prep_sub.add_parser("peft-u", help="PEFT-U: raw files -> OUT/user_data_leaked.json (+ dropped users)")
    from fedpeft.data.peft_u import PREPARE_TASKS

    pu.add_argument("--task", required=True, choices=PREPARE_TASKS)
    pu.add_argument("--raw", default=None, help="folder with the task's raw files (PEFT-U's data/<task>/); "
                    "measuringhatespeech: a datasets copy (save_to_disk folder or parquet/arrow/csv files), or omit it "
                    "to use the Hugging Face cache (set HF_HUB_OFFLINE=1 without network)")
    pu.add_argument("--out", required=True, help="output folder (set data.path to it)")
    pu.add_argument("--seed", type=int, default=42, help="split seed (PEFT-U: 42)")
    pu.add_argument("--min-examples", type=int, default=10, help="drop users with fewer examples (PEFT-U: 10)")

    dl = sub.add_parser("download", help="download official benchmark files")
    dl_sub = dl.add_subparsers(dest="family", required=True)
    lp = dl_sub.add_parser("lamp", help="LaMP: {train,dev}_{questions,outputs}.json and test_questions.json")
    from fedpeft.data.lamp_download import BASE_URL

    lp.add_argument("--task", required=True, help="LaMP-1 .. LaMP-7 (LaMP-6 is not distributed)")
    lp.add_argument("--split", default="user", choices=("user", "time"), help="user-based or time-based split")
    lp.add_argument("--out", required=True, help="output folder (set data.path to it)")
    lp.add_argument("--base-url", default=BASE_URL, help=f"server root (default {BASE_URL})")
    lp.add_argument("--sets", default="train,dev,test", help="comma list of train, dev, test")
    lp.add_argument("--timeout", type=float, default=60.0, help="seconds per connection attempt")
    lp.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            from fedpeft.data.peft_u import prepare

            summary = prepare(args.task, args.raw, args.out, seed=args.seed, drop_threshold=args.min_examples)
            dropped = summary["users_dropped"]
            print(f"PEFT-U {summary['task']}: {summary['users_in']} users read, {summary['users_kept']} kept, "
                  f"{len(dropped)} dropped (fewer than {args.min_examples} examples)"
                  + (f": {', '.join(dropped)}" if dropped else ""))
            print(f"examples: {json.dumps(summary['examples'])}; kind: {summary['kind']}; labels: {', '.join(summary['labels'])}")
            if summary["users_with_empty_split"]:
                print(f"kept users with an empty split (skipped by the loader when train or test is empty): "
                      f"{json.dumps(summary['users_with_empty_split'])}")
            print(f"wrote {summary['out']}; set data.path={args.out}")
        else:
            from fedpeft.data.lamp_download import download

            sets = tuple(s.strip() for s in args.sets.split(",") if s.strip())
            sizes = download(args.task, args.split, args.out, base_url=args.base_url, sets=sets, timeout=args.timeout,
                             progress=not args.no_progress)
            for name, size in sizes.items():
                print(f"{name}: {size:,} bytes")
            print(f"set data.path={args.out} (data.benchmark=lamp/{args.task}, data.lamp_split={args.split})")
    except (ConfigError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
