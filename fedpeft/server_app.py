"""The ServerApp: discovers users, runs rounds of sampled cohorts, evaluates every user.

The server only ever handles the strategy's shared keys; private state stays in the clients'
adapter store. A reply that reports a failure marks its user failed; the run goes on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedpeft import metrics as M
from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.messages import EVALUATE, QUERY, TRAIN, array_bytes, make_content
from fedpeft.reporting import RunReporter
from fedpeft.scoring import corpus_scores
from fedpeft.store import AdapterStore
from strategies import make_strategy
from strategies.base import Phase

NODE_WAIT_SECONDS = 120


def exchange(grid: Grid, messages: list[Message], on_reply: Callable[[Message], None] | None = None) -> list[Message]:
    """Push messages and pull their replies, calling ``on_reply`` as each one arrives."""
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            if on_reply:
                on_reply(reply)
        if pending and not got:
            time.sleep(0.05)
    return replies


class FederatedRun:
    """One simulation run, driven from the ServerApp's main function."""

    def __init__(self, config: Config, run_dir: Path, grid: Grid, initial_shared: dict[str, torch.Tensor],
                 accounting: dict[str, Any]) -> None:
        self.config = config
        self.initial_shared = initial_shared
        self.accounting = accounting
        self.config_json = config.to_json()
        self.grid = grid
        self.run_dir = run_dir
        self.strategy = make_strategy(config)
        self.user_ids = get_benchmark(config).user_ids()
        self.task = get_benchmark(config).task()
        self.metric_names = list(self.task.metrics)  # the first one is the headline
        self.reporter = RunReporter(config, run_dir)
        self.failures: list[dict[str, Any]] = []  # one record per failed call: round, call, user, reason
        self.rounds_trained = np.zeros(len(self.user_ids), dtype=int)
        self.examples_processed = np.zeros(len(self.user_ids), dtype=np.int64)
        self.worker_loads: dict[int, int] = {}
        self.total_rounds = sum(p.rounds for p in self.strategy.phases())
        self.bar = tqdm(total=0, unit="user", disable=not config.output.progress, dynamic_ncols=True)

    # ---- plumbing ------------------------------------------------------------------------
    def discover(self) -> dict[int, int]:
        """Map partition id (user index) -> node id by asking every node once."""
        deadline = time.time() + NODE_WAIT_SECONDS
        while len(nodes := list(self.grid.get_node_ids())) < len(self.user_ids):
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {len(self.user_ids)} simulated nodes came up")
            time.sleep(0.2)
        msgs = [Message(content=make_content(self.config_json, 0), dst_node_id=n, message_type=QUERY) for n in nodes]
        return {int(r.content.metric_records["metrics"]["partition_id"]): r.metadata.src_node_id
                for r in exchange(self.grid, msgs)}

    def call(self, users: list[int], kind: str, server_round: int, shared: dict[str, torch.Tensor], phase: str) -> tuple[list[Message], int]:
        """Send one message per user; returns the replies, in partition order (never arrival order,
        so that aggregation and every sum over replies is deterministic), and the bytes sent down."""
        msgs = [Message(content=make_content(self.config_json, server_round, shared, phase), dst_node_id=self.nodes[u],
                        message_type=kind) for u in users]
        down = sum(array_bytes(m.content) for m in msgs)
        self.bar.set_description(f"round {server_round}/{self.total_rounds} {phase} {kind}")
        self.bar.refresh()
        replies = exchange(self.grid, msgs, on_reply=lambda _: self.bar.update(1))
        for reply in replies:
            self._note_reply(reply, kind, server_round, phase)
        return sorted(replies, key=partition_id), down

    def _note_reply(self, reply: Message, kind: str, server_round: int, phase: str) -> None:
        if reply.has_error():
            raise RuntimeError(f"a ClientApp crashed outside fedpeft's handlers: {reply.error.reason}")
        m = reply.content.metric_records["metrics"]
        self.worker_loads[int(m["pid"])] = max(self.worker_loads.get(int(m["pid"]), 0), int(m["backbone_loads"]))
        if m["failed"]:
            user = partition_id(reply)
            reason = str(reply.content.config_records["info"]["error"]).strip()
            self.failures.append({"round": server_round, "phase": phase, "call": kind, "user_id": self.user_ids[user],
                                  "partition_id": user, "error": reason.splitlines()[-1] if reason else "", "traceback": reason})

    # ---- the run ------------------------------------------------------------------------
    def train_round(self, server_round: int, phase: Phase, shared: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        cohort = self.strategy.sample_cohort(list(range(len(self.user_ids))), server_round, phase)
        replies, down = self.call(cohort, TRAIN, server_round, shared, phase.name)
        ok = [r for r in replies if not r.content.metric_records["metrics"]["failed"]]
        for reply in ok:
            self.rounds_trained[partition_id(reply)] += 1
            self.examples_processed[partition_id(reply)] += int(reply.content.metric_records["metrics"]["examples_processed"])
            sent = set(reply.content.array_records["shared"].keys())
            private = {k for k in sent if not self.strategy.is_shared(k, phase.name)}
            if private:  # the privacy invariant: refuse loudly rather than aggregate a private key
                raise RuntimeError(f"a client sent keys that are private in phase '{phase.name}': {sorted(private)[:3]}")
        new_shared = self.strategy.aggregate(server_round, shared, ok)
        metric = lambda key: [r.content.metric_records["metrics"][key] for r in ok]  # noqa: E731
        losses = [v for v in metric("train_loss") if not np.isnan(v)]
        return new_shared, {
            "phase": phase.name, "cohort_size": len(cohort), "trained": len(ok), "failed": len(replies) - len(ok),
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "bytes_down": down, "bytes_up": sum(array_bytes(r.content) for r in replies),
            "private_bytes_mean": float(np.mean(metric("private_bytes"))) if ok else 0.0,
        }

    def evaluate(self, server_round: int, shared: dict[str, torch.Tensor], users: list[int], phase: str) -> list[Message]:
        replies, _ = self.call(users, EVALUATE, server_round, shared, phase)
        return [r for r in replies if not r.content.metric_records["metrics"]["failed"]]

    def eval_users(self, server_round: int) -> list[int]:
        fed = self.config.federation
        everyone = list(range(len(self.user_ids)))
        if server_round == self.total_rounds or fed.eval_fraction >= 1:
            return everyone
        size = max(1, round(fed.eval_fraction * len(everyone)))
        return sorted(np.random.default_rng([self.config.seed, 30, server_round]).choice(everyone, size, replace=False).tolist())

    def schedule(self) -> list[tuple[int, Phase]]:
        """(global round number, phase) for every round of every phase."""
        rounds = [phase for phase in self.strategy.phases() for _ in range(phase.rounds)]
        return list(enumerate(rounds, start=1))

    def run(self) -> dict[str, Any]:
        started = time.time()
        self.nodes = self.discover()
        shared = dict(self.initial_shared)
        fed = self.config.federation
        final: list[Message] = []
        totals = {"bytes_down": 0, "bytes_up": 0}
        users = list(range(len(self.user_ids)))
        self.bar.total = sum(len(self.strategy.sample_cohort(users, r, phase)) for r, phase in self.schedule()) + sum(
            len(self.eval_users(r)) for r, _ in self.schedule() if r % fed.eval_every == 0 or r == self.total_rounds)
        self.bar.refresh()
        for server_round, phase in self.schedule():
            round_start = time.time()
            shared, record = self.train_round(server_round, phase, shared)
            totals["bytes_down"] += record["bytes_down"]
            totals["bytes_up"] += record["bytes_up"]
            if server_round % fed.eval_every == 0 or server_round == self.total_rounds:
                final = self.evaluate(server_round, shared, self.eval_users(server_round), phase.name)
                record.update(self.scores(final))
                record["n_evaluated"] = len(final)
            record.update({"round": server_round, "seconds": time.time() - round_start,
                           "failed_calls_total": len(self.failures),
                           "bytes_down_total": totals["bytes_down"], "bytes_up_total": totals["bytes_up"]})
            self.reporter.log_round(record)
            headline = self.metric_names[0]
            self.bar.write(f"round {server_round} ({phase.name}): trained {record['trained']}/{record['cohort_size']}, "
                           f"loss {record['train_loss']:.4f}, {headline} {record.get(headline, float('nan')):.4f}")
        self.bar.close()
        return self.finish(final, shared, time.time() - started, totals)

    def scores(self, replies: list[Message]) -> dict[str, float]:
        """Each metric's headline value under its plain name (LaMP: the benchmark's own corpus-level
        score over all questions; PEFT-U and synthetic: the unweighted mean over users of per-user
        scores) and its per-user distribution (``_mean``, ``_median``, ``_p10``, ``_min``)."""
        out: dict[str, float] = {}
        for name in self.metric_names:
            stats = M.summarize([r.content.metric_records["metrics"][name] for r in replies])
            out.update({f"{name}_{k}": stats[k] for k in ("mean", "median", "p10", "min")})
            out[name] = stats["mean"]
        if self.task.corpus_metrics and replies:
            infos = [r.content.config_records["info"] for r in replies]
            predictions = [p for info in infos for p in info["predictions"]]
            golds = [g for info in infos for g in json.loads(str(info["golds"]))]
            out.update(corpus_scores(self.task, predictions, golds))
        return out

    def finish(self, final: list[Message], shared: dict[str, torch.Tensor], wall: float, totals: dict[str, int]) -> dict[str, Any]:
        if shared:
            save_file({k: v.contiguous() for k, v in shared.items()}, str(self.run_dir / "shared_final.safetensors"))
        scores = {partition_id(r): r for r in final}
        last_failure = {f["partition_id"]: f for f in self.failures}  # the latest failure of each user
        per_user, predictions = [], []
        for index, user_id in enumerate(self.user_ids):
            row: dict[str, Any] = {"user_id": user_id, "partition_id": index, "rounds_trained": int(self.rounds_trained[index]),
                                   "examples_processed": int(self.examples_processed[index]),
                                   "failed_calls": sum(f["partition_id"] == index for f in self.failures)}
            if index not in scores:  # a user scored at the end counts as scored, whatever failed before
                failure = last_failure.get(index, {"error": "no evaluation reply", "traceback": ""})
                row.update(status="failed", error=failure["error"], traceback=failure["traceback"])
            else:
                m, info = scores[index].content.metric_records["metrics"], scores[index].content.config_records["info"]
                row.update(status="ok", n_test=int(m["n_test"]), error="", **{name: m[name] for name in self.metric_names})
                predictions.append({"user_id": user_id, "sample_ids": list(info["sample_ids"]), "predictions": list(info["predictions"])})
            per_user.append(row)
        stored = [AdapterStore(self.config.output.store_dir).bytes_stored(u) for u in self.user_ids]
        ok = [row for row in per_user if row["status"] == "ok"]
        n_failed = len(per_user) - len(ok)
        skipped = get_benchmark(self.config).skipped_users()
        summary: dict[str, Any] = {"n_evaluated": len(ok), "n_failed": n_failed, "n_skipped": len(skipped),
                                   **self.scores([scores[row["partition_id"]] for row in ok])}
        results = {
            "metrics": self.metric_names,
            "headline": "corpus" if self.task.corpus_metrics else "mean over users",
            "strategy": self.config.federation.strategy, "benchmark": self.config.data.benchmark,
            "model": self.config.model.name, "num_users": len(self.user_ids), "rounds": self.total_rounds,
            "summary": summary, "wall_seconds": wall, "run_dir": str(self.run_dir),
            "communication": {**totals, "bytes_total": totals["bytes_down"] + totals["bytes_up"]},
            "parameters": {k: v for k, v in self.accounting.items() if k != "pretrain_examples"},
            "private_bytes_per_user": {"mean": float(np.mean(stored)) if stored else 0.0, "max": int(max(stored, default=0))},
            "failed_users": {row["user_id"]: row["error"] for row in per_user if row["status"] != "ok"},
            "failed_calls": len(self.failures),
            "compute": {"examples_processed_per_user_mean": float(self.examples_processed.mean()) if len(self.user_ids) else 0.0,
                        "examples_processed_total": int(self.examples_processed.sum()),
                        "driver_pretrain_examples": int(self.accounting.get("pretrain_examples", 0))},
            "skipped_users": skipped,
            "workers": {str(pid): loads for pid, loads in sorted(self.worker_loads.items())},
        }
        self.reporter.write_final(per_user, results, predictions, self.metric_names, self.failures)
        return results


def partition_id(reply: Message) -> int:
    return int(reply.content.metric_records["metrics"]["partition_id"])


def make_server_app(config: Config, run_dir: Path, results: dict[str, Any], initial_shared: dict[str, torch.Tensor],
                    accounting: dict[str, Any]) -> ServerApp:
    """A ServerApp whose main runs one :class:`FederatedRun` and puts its results in ``results``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        results.update(FederatedRun(config, run_dir, grid, initial_shared, accounting).run())

    return app
