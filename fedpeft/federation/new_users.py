"""New users (``data.new_users``): held out of every round, fine-tuned and scored after the last.

Each new user takes the final shared part, trains what the strategy gives a new user (its private
part; fedavg: the whole model) on its own training split, and is scored
(:func:`fine_tune_new_users`); where the final shared part is a new user's whole model (fedavg),
it is also scored before the fine-tune ("as_is"). :func:`new_user_groups` is their summary in
results.json's ``groups``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Message

from fedpeft.federation.evaluation import Scoring
from fedpeft.federation.messages import TRAIN
from fedpeft.federation.progress import RunProgress, partition_id
from fedpeft.strategies.base import NEW_USERS


def fine_tune_new_users(progress: RunProgress, total_rounds: int, last_phase: str, score_as_is: bool,
                        call: Callable[[list[int], str, int, str], tuple[list[Message], int]],
                        evaluate: Callable[[int, list[int], str], list[Message]],
                        save: Callable[[], None], note: Callable[[str], Any], headline: str) -> dict[str, list[Message]]:
    """Fine-tune and score the new users after the last round (``total_rounds``, of phase
    ``last_phase``); returns their scores after the fine-tune ("new") and, with ``score_as_is``,
    before it ("as_is"). ``call(users, kind, round, phase)`` sends a call with the final shared
    part, ``evaluate(round, users, phase)`` scores users, ``save()`` checkpoints the run (which
    then records each new user's adapter, for export) and ``note`` writes a line. A resumed run
    does it all again from the start (the same final shared part and seeds: the same results)."""
    new_users = progress.new_users
    if not new_users:
        return {"new": [], "as_is": []}
    progress.last_round[new_users] = 0  # they start from the common init, also when done before
    progress.examples_processed[new_users] = 0
    fine_tune_round = total_rounds + 1  # its seed and store file; never a round of the schedule
    as_is = evaluate(total_rounds, new_users, last_phase) if score_as_is else []
    trained, down = call(new_users, TRAIN, fine_tune_round, NEW_USERS)
    progress.totals["bytes_down"] += down
    for reply in trained:
        progress.record_training(reply, fine_tune_round)
    save()
    new = evaluate(fine_tune_round, [partition_id(r) for r in trained], last_phase)
    values = [r.content.metric_records["metrics"][headline] for r in new]
    note(f"new users: fine-tuned {len(trained)}/{len(new_users)}, {headline} "
         f"{float(np.mean(values)) if values else float('nan'):.4f}")
    return {"new": new, "as_is": as_is}


def new_user_groups(per_user: list[dict[str, Any]], scores: dict[int, Message], as_is: dict[int, Message],
                    count: int, scoring: Scoring) -> dict[str, dict[str, Any]]:
    """The ``count`` new users' summaries: after the fine-tune ("new") and, fedavg, before it ("new_as_is")."""
    scored = [row["partition_id"] for row in per_user if row["group"] == "new" and row["status"] == "ok"]
    groups = {"new": {"users": count, "n_evaluated": len(scored), "n_failed": count - len(scored),
                      **scoring.scores([scores[i] for i in scored])}}
    if as_is:
        groups["new_as_is"] = {"users": count, "n_evaluated": len(as_is), "n_failed": count - len(as_is),
                               **scoring.scores(list(as_is.values()))}
    return groups
