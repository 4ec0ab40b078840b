"""One sweep metric, the same in both sweep modes: ``selected_val_<headline>``, the validation score
at the round ``federation.select`` picks, read by the offline engine (``fedpeft.sweep.logged_metrics``)
and by a W&B agent (the W&B run's summary) alike, and never a test score.

The W&B side is read from the offline run's own transaction log (``run-<id>.wandb``: W&B 0.31
writes no ``wandb-summary.json`` offline; ``wandb sync`` uploads this file, and the server's
summary is these summary records applied in order)."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path
from typing import Any

from fedpeft.federation.checkpoint import RunIdentity
from fedpeft.sweep import logged_metrics
from tests.inprocess_grid import run_in_process
from tests.test_selection import learning_config

BLOCK, HEADER = 32768, 7  # W&B's transaction log: LevelDB's log format, after a 7-byte file header
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file (W&B's ``Record``), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no W&B transaction log"
    pos, pending, out = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # a block's padding
            pos += left
            continue
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind in (FULL, FIRST):
            pending = chunk
        elif kind in (MIDDLE, LAST):
            pending += chunk
        if kind in (FULL, LAST):
            out.append(pb.Record.FromString(pending))
    return out


def finished_records(run_dir: Path, wait: float = 120.0) -> list[Any]:
    """The offline run's records once its ``exit`` record is on disk: ``run.finish()`` returns
    before W&B's service has flushed its writer, which on a loaded machine can take seconds."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + wait
    while True:
        records = wandb_records(log)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def wandb_summary(run_dir: Path) -> dict[str, Any]:
    """The offline W&B run's summary: its summary records' top-level updates, applied in order."""
    summary: dict[str, Any] = {}
    for record in finished_records(run_dir):
        if record.WhichOneof("record_type") != "summary":
            continue
        for item in record.summary.update:
            path = [item.key] if item.key else list(item.nested_key)
            if len(path) == 1:
                summary[path[0]] = json.loads(item.value_json)
        for item in record.summary.remove:
            summary.pop(item.key or item.nested_key[0], None)
    return summary


def test_offline_engine_and_wandb_see_the_same_validation_score_at_the_selected_round(tiny_bert, tmp_path, monkeypatch):
    """Before: the offline engine read metrics.jsonl's last line and W&B the run summary; neither
    had a validation score at the selected round, so a sweep could only tune on test scores."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = learning_config(tiny_bert, tmp_path, "best_val", "best_val")
    cfg.wandb.mode, cfg.seed = "offline", 2  # seed 2: the best validation round is round 1 of 4
    results, run = run_in_process(cfg)
    name = "selected_val_accuracy"  # the headline is accuracy

    offline, _history = logged_metrics(tmp_path, RunIdentity.read(run).wandb_id)
    online = wandb_summary(run)
    assert name in results["summary"], sorted(results["summary"])
    assert name in offline, f"the offline engine does not see {name}: {sorted(offline)}"
    assert name in online, f"the W&B summary has no {name}: {sorted(online)}"
    assert offline[name] == online[name] == results["summary"][name]

    # independently: the mean validation accuracy of the round with the best mean validation accuracy
    rows = [json.loads(line) for line in (run / "rounds_per_user.jsonl").read_text().splitlines()]
    rounds = sorted({r["round"] for r in rows})
    val = {k: [r["val"]["accuracy"] for r in rows if r["round"] == k] for k in rounds}
    assert all(len(v) == cfg.data.num_users for v in val.values())  # everyone scored on validation every round
    mean_val = {k: sum(v) / len(v) for k, v in val.items()}
    best = max(rounds, key=lambda k: (round(mean_val[k], 12), -k))
    assert results["selection"]["round"] == best < rounds[-1], "the fixture should pick an earlier round than the last"
    assert math.isclose(offline[name], mean_val[best], abs_tol=1e-12)
    # ... which is not what the names a sweep used before hold: test scores, or the last round's validation
    assert name not in results["metrics"] and not name.startswith(tuple(results["metrics"]))
    assert offline["accuracy"] == online["accuracy"] == results["summary"]["accuracy"]  # the test headline
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert not math.isclose(last["val_accuracy"], offline[name], abs_tol=1e-12)
