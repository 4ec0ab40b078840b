"""The in-process variants of sims/throughput.py: the plain loop, a FlowerTune-style client, pfl-research.

Each takes the :class:`~sims.throughput_workload.Workload` and returns its result row (training
and final-evaluation seconds, examples trained and predicted, accuracy, model builds):
:func:`run_plain` (one peft model, adapters swapped in from a dict; ``fedavg`` averages them every
round), :func:`run_flowertune` (every call builds the model anew, sequentially) and
:func:`run_pfl` (FedAvg in pfl-research, a benchmark-only extra that :func:`pfl_available` probes).
:data:`IN_PROCESS` maps the variant names to them; the script runs each in its own interpreter.
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
import torch

from sims.throughput_workload import (
    Workload,
    adapter_of,
    batch,
    build_peft_model,
    call_seed,
    fedavg,
    final_evaluation,
    load_adapter,
    train_call,
)


def run_plain(work: Workload, strategy: str = "local_only") -> dict:
    """The plain PyTorch + peft loop: one model, adapters swapped in from a dict."""
    model = build_peft_model(work)
    init = adapter_of(model)
    states = {u: init for u in range(len(work.users))}
    rounds, examples, losses = work.config.federation.rounds, 0, []
    started = time.time()
    for r in range(1, rounds + 1):
        for u in range(len(work.users)):
            load_adapter(model, states[u])
            n, call_losses = train_call(model, work, u, r)
            examples, losses = examples + n, losses + call_losses
            states[u] = adapter_of(model)
        if strategy == "fedavg":
            shared = fedavg([states[u] for u in states], [len(w.train["labels"]) for w in work.users])
            states = {u: shared for u in states}
    train_s = time.time() - started
    started = time.time()

    def with_adapter(u: int):
        load_adapter(model, states[u])
        return model

    score, predicted = final_evaluation(with_adapter, work)
    return {"train_s": train_s, "eval_s": time.time() - started, "examples": examples, "eval_examples": predicted,
            "accuracy": score, "train_loss_last_round": _last_round_loss(losses, work), "model_builds": 1}


def run_flowertune(work: Workload) -> dict:
    """FlowerTune's client habit: every call builds the model (``from_pretrained`` +
    ``get_peft_model``), loads the user's adapter, trains and keeps the adapter; sequential."""
    init = adapter_of(build_peft_model(work))  # the server's initial parameters
    states = {u: init for u in range(len(work.users))}
    rounds, examples, losses, builds = work.config.federation.rounds, 0, [], 1
    started = time.time()
    for r in range(1, rounds + 1):
        for u in range(len(work.users)):
            model = build_peft_model(work, seeded=False)
            builds += 1
            load_adapter(model, states[u])
            n, call_losses = train_call(model, work, u, r)
            examples, losses = examples + n, losses + call_losses
            states[u] = adapter_of(model)
            del model
    train_s = time.time() - started
    started = time.time()

    def built(u: int):
        nonlocal builds
        model = build_peft_model(work, seeded=False)
        builds += 1
        load_adapter(model, states[u])
        return model

    score, predicted = final_evaluation(built, work)
    return {"train_s": train_s, "eval_s": time.time() - started, "examples": examples, "eval_examples": predicted,
            "accuracy": score, "train_loss_last_round": _last_round_loss(losses, work), "model_builds": builds}


def _last_round_loss(losses: list[float], work: Workload) -> float:
    per_round = len(losses) // work.config.federation.rounds
    return float(np.mean(losses[-per_round:])) if per_round else float("nan")


def run_pfl(work: Workload) -> dict:
    """The FedAvg workload in pfl-research: its own algorithm, backend, model and datasets."""
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    class Module(torch.nn.Module):
        """pfl's model interface (``loss``, ``metrics``) around the peft model."""

        def __init__(self, net) -> None:
            super().__init__()
            self.net = net

        def loss(self, input_ids, token_type_ids, attention_mask, labels):
            logits = self.net(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask).logits
            return torch.nn.functional.cross_entropy(logits.float(), labels)

        def metrics(self, input_ids, *rest, **kwargs):
            # pfl evaluates the cohort before and after local training at iteration 0 whatever
            # evaluation_frequency is; no other variant does, so this counts rows, no forward pass
            return {"rows": Weighted(0.0, float(len(input_ids)))}

    class Steps(Dataset):
        """One user's call as pfl iterates it: exactly the call's batches, in order."""

        def __init__(self, user_index: int, server_round: int) -> None:
            data = work.users[user_index].train
            self.batches = []
            for rows in work.steps(user_index, server_round):
                inputs, labels = batch(data, rows)
                self.batches.append((inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"], labels))
            super().__init__(raw_data=tuple(self.batches), user_id=str(user_index))

        def __len__(self) -> int:
            return sum(len(b[-1]) for b in self.batches)

        def iter(self, batch_size):  # noqa: A003 - pfl's name
            yield from self.batches

    calls = {u: 0 for u in range(len(work.users))}
    examples = 0

    def make_dataset(user: str) -> Steps:
        nonlocal examples
        u = int(user)
        calls[u] += 1  # pfl makes a user's dataset right before training it
        torch.manual_seed(call_seed(work.config.seed, u, calls[u]))  # the call's dropout, as the others
        data = Steps(u, calls[u])
        examples += len(data)
        return data

    tr, rounds, n_users = work.config.train, work.config.federation.rounds, len(work.users)
    net = Module(build_peft_model(work))
    trainable = [q for q in net.parameters() if q.requires_grad]
    model = PyTorchModel(
        net, local_optimizer_create=lambda params, lr: torch.optim.AdamW(
            [q for q in params if q.requires_grad], lr=lr, weight_decay=tr.weight_decay),
        central_optimizer=torch.optim.SGD(trainable, lr=1.0))  # w + mean(user updates): FedAvg
    federated = FederatedDataset(make_dataset, get_user_sampler("minimize_reuse", [str(u) for u in range(n_users)]))
    backend = SimulatedBackend(training_data=federated, val_data=None)
    params = NNAlgorithmParams(central_num_iterations=rounds, evaluation_frequency=rounds + 1,
                               train_cohort_size=n_users, val_cohort_size=None)
    net.train()
    started = time.time()
    with contextlib.redirect_stdout(sys.stderr):  # pfl's platform prints metrics every iteration
        FederatedAveraging().run(algorithm_params=params, backend=backend, model=model,
                                 model_train_params=NNTrainHyperParams(local_num_epochs=1, local_learning_rate=tr.lr,
                                                                       local_batch_size=tr.batch_size),
                                 model_eval_params=NNEvalHyperParams(local_batch_size=tr.eval_batch_size))
    train_s = time.time() - started
    if sorted(set(calls.values())) != [rounds]:
        raise RuntimeError(f"pfl did not train every user once per round: calls per user {calls}")
    started = time.time()
    score, predicted = final_evaluation(lambda u: net.net, work)
    return {"train_s": train_s, "eval_s": time.time() - started, "examples": examples, "eval_examples": predicted,
            "accuracy": score, "model_builds": 1}


IN_PROCESS = {"plain-local_only": lambda w: run_plain(w, "local_only"), "plain-fedavg": lambda w: run_plain(w, "fedavg"),
              "flowertune-local_only": run_flowertune, "pfl-fedavg": run_pfl}


def pfl_available() -> str:
    """'' when pfl-research imports, else why not."""
    try:
        import pfl  # noqa: F401
        from pfl.model.pytorch import PyTorchModel  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure means: skip the variant
        return f"{type(err).__name__}: {err}"
    return ""
