"""User-level differential privacy on the shared part: the mechanism.

**Unit of privacy.** One user = one client. What leaves a user is its shared update (the change
it makes to the shared part in a round); private keys never reach the server and need nothing.
The guarantee covers the sequence of shared parts the server releases; it does not cover
training metrics, evaluation scores or fedpeft's own logs (which users trained in which round).

**Mechanism** (Flower's own wrappers, :class:`PrivateAggregator`): each user's update is clipped
to L2 norm ``privacy.clipping_norm`` = C (by the server: ``central``, ``central_adaptive``; by
the client, :func:`clip_shared_update`: ``client``), and the server releases the sum of the
clipped updates divided by m, the users *sampled* in the round (a fixed denominator), plus
Gaussian noise of std sigma * C / m (Flower's ``num_sampled_clients``). A sampled user that
failed, was dropped or did not answer contributes a zero update: the server pads the replies
with zero updates (the shared part as sent) up to m, so Flower's equal-weight mean divides by m.
The sensitivity is then C / m whatever fails, failures cost no epsilon, a round in which every
sampled user failed still releases (pure noise around the current shared part) and spends its
epsilon, and the accountant composes exactly sigma per round: the spent epsilon does not depend
on who failed (which may depend on their data), and ``privacy.max_epsilon`` and
``privacy.target_epsilon`` hold exactly. The cost: a failed user's share of the mean is zero,
so with m' of m users replying the mean of the updates shrinks towards the current shared part
by m' / m. FedAdam/FedYogi run on the noisy mean (post-processing); FedProx is local.

**Accounting** (the spent epsilon, delta, sigma calibrated to a target) lives in
:mod:`fedpeft.federation.privacy_accounting`; what is refused or settled before Ray starts, in
:mod:`fedpeft.federation.privacy_checks`.

**Randomness.** Flower draws the noise from numpy's global generator; :func:`seeded_numpy` seeds
it per round from ``(seed, 50, round)`` and restores it afterwards, so a run (and a resumed
run) is reproducible. Anyone who knows the seed can therefore subtract the noise: this measures
the utility cost of a privacy level; it is not a deployment.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.differential_privacy import (
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
    get_norm,
)

from fedpeft.config import Config, PrivacyConfig
from fedpeft.federation.privacy_accounting import Release

State = dict[str, torch.Tensor]
UNIFORM_WEIGHT = "dp-equal-weight"  # the metric the equal-weight FedAvg inside the DP wrapper averages by
NOISE_STREAM = 50  # numpy seed of a round's noise: (seed, NOISE_STREAM, round)


def adaptive_count_stddev(privacy: PrivacyConfig, sampled: int) -> float:
    """Flower's std of the clipped-count noise: ``privacy.clipped_count_stddev``, or users sampled / 20."""
    return privacy.clipped_count_stddev or sampled / 20


# ---- the mechanism (server) ----------------------------------------------------------------
@contextmanager
def seeded_numpy(seed: Sequence[int]) -> Iterator[None]:
    """numpy's global generator (Flower's noise source) seeded from ``seed``, restored afterwards."""
    saved = np.random.get_state()
    np.random.seed(np.random.SeedSequence(list(seed)).generate_state(4))
    try:
        yield
    finally:
        np.random.set_state(saved)


def _reply(record: ArrayRecord, metrics: dict[str, float], like: Message | None) -> Message:
    """A train reply holding only ``record`` as "shared" (what Flower's wrappers may read and rewrite),
    with the metadata of ``like``; None: a stand-in (a failed user's zero update), never sent."""
    content = RecordDict({"shared": record, "metrics": MetricRecord(metrics)})
    if like is None:
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=like.metadata)


def mean_reply(record: ArrayRecord, weighted_by_key: str, like: Message | None) -> Message:
    """One reply carrying an aggregate, for the server optimiser to step on (its mean is itself)."""
    return _reply(record, {weighted_by_key: 1.0}, like)


class _AdaptiveClipping(flwr_strategy.DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's wrapper, noising the mean with the norm the round's updates were clipped to
    (Flower's updates the norm first and noises with the new one: too little noise when it shrinks)."""

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.round_norm = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated, self.clipping_norm = self.clipping_norm, self.round_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = updated


class PrivateAggregator:
    """The noisy sum of the replies' clipped "shared" updates over the users sampled, through
    Flower's DP wrappers.

    Each wrapper goes around a Flower ``FedAvg`` that weighs every user 1, and sees copies of the
    replies' shared records only, padded up to the users sampled with zero updates (the shared
    part as sent) for the users that failed, so that Flower's mean divides by the users sampled
    (the module docstring says why). Under ``central_adaptive`` a padded zero update is an
    unclipped update (norm bit 1), as a user whose update is zero would be. ``central``: ``DifferentialPrivacyServerSideFixedClipping``
    clips and noises. ``client``: ``DifferentialPrivacyClientSideFixedClipping`` noises what the
    clients clipped (the server checks the norms). Two Flower 1.42 defects are worked around:

    - server-side clipping divides by the update's norm (``clip_inputs_inplace``), so a round with
      an exactly zero update (e.g. fedsa's LoRA A after one step from B = 0) is clipped here with
      Flower's clipping helper and noised by the client-side wrapper: the same mechanism;
    - the adaptive wrappers count *clipped* updates (``adaptive_clip_inputs_inplace`` returns
      ``scaling_factor < 1``) in Andrew et al.'s update ``C *= exp(-lr (b - gamma))``, whose ``b``
      is the fraction *unclipped*, so the norm runs away from the target quantile (towards 0 when
      most updates are clipped). ``central_adaptive`` therefore clips here with Flower's
      ``compute_adaptive_clip_model_update`` and gives ``DifferentialPrivacyClientSideAdaptiveClipping``
      the unclipped bit and the target 1 - ``privacy.target_clipped_quantile``; that wrapper then
      noises the count, updates the norm and noises the mean as Flower does, except that the
      mean's noise uses the norm the round clipped to, not the one just updated
      (:class:`_AdaptiveClipping`): std sigma_updates * C / m.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clipping_norm = config.privacy.clipping_norm  # central_adaptive: the current norm (server state)
        self._wrappers: dict[tuple[str, int], Any] = {}

    def _wrapper(self, kind: str, sampled: int) -> Any:
        if (kind, sampled) not in self._wrappers:
            pr, mean = self.config.privacy, flwr_strategy.FedAvg(arrayrecord_key="shared", weighted_by_key=UNIFORM_WEIGHT)
            if kind == "adaptive":
                wrapper = _AdaptiveClipping(
                    mean, pr.noise_multiplier, sampled, initial_clipping_norm=self.clipping_norm,
                    target_clipped_quantile=1 - pr.target_clipped_quantile, clip_norm_lr=pr.clip_norm_lr,
                    clipped_count_stddev=adaptive_count_stddev(pr, sampled))
            elif kind == "server":
                wrapper = flwr_strategy.DifferentialPrivacyServerSideFixedClipping(mean, pr.noise_multiplier, pr.clipping_norm, sampled)
            else:
                wrapper = flwr_strategy.DifferentialPrivacyClientSideFixedClipping(mean, pr.noise_multiplier, pr.clipping_norm, sampled)
            self._wrappers[(kind, sampled)] = wrapper
        return self._wrappers[(kind, sampled)]

    def aggregate(self, server_round: int, current: dict[str, np.ndarray], replies: list[Message],
                  sampled: int, keys: list[str] | None = None) -> tuple[ArrayRecord, Release]:
        """The noisy sum of the clipped updates of ``replies`` divided by ``sampled`` (each sampled
        user that did not reply counts as a zero update), and the release for the accountant.
        ``current``: the shared part the users started from, as it travelled; ``keys``: the keys
        the round shares (default: the replies'; needed when no user replied)."""
        mechanism, records = self.config.privacy.mechanism, [r.content.array_records["shared"] for r in replies]
        if keys is None:
            keys = [k for k in current if records and k in records[0]]
        if not keys or any(k not in current for k in keys) or any(set(rec.keys()) != set(keys) for rec in records):
            raise RuntimeError("privacy: the replies' shared keys differ from each other or from the server's shared part")
        if not 0 <= len(replies) <= sampled or sampled < 1:
            raise ValueError(f"privacy: {len(replies)} replies for {sampled} users sampled")
        base = [current[k] for k in keys]
        updates = [[rec[k].numpy() for k in keys] for rec in records]
        updates += [[c.copy() for c in base] for _ in range(sampled - len(replies))]  # the failed users: zero updates
        norms = [get_norm([u - c for u, c in zip(upd, base)]) for upd in updates]
        C = self.clipping_norm if mechanism == "central_adaptive" else self.config.privacy.clipping_norm
        metrics: list[dict[str, float]] = [{UNIFORM_WEIGHT: 1.0} for _ in updates]
        if mechanism == "client":
            kind, slack = "client", 1e-5 * C + np.finfo(np.float32).eps * (get_norm(base) + C)
            if max(norms) > C + slack:
                raise RuntimeError(f"privacy.mechanism=client: a client sent a shared update of norm {max(norms):.6g} > "
                                   f"privacy.clipping_norm {C}; the client must clip it (fedpeft.federation.privacy.clip_shared_update)")
        elif mechanism == "central" and min(norms) > 0:
            kind = "server"
        else:  # clipped here with Flower's helpers (see the class docstring)
            kind = "adaptive" if mechanism == "central_adaptive" else "client"
            for upd, norm, m in zip(updates, norms, metrics):
                clipped = norm > 0 and compute_adaptive_clip_model_update(upd, base, C)
                if kind == "adaptive":
                    m[KEY_NORM_BIT] = 0.0 if clipped else 1.0  # Andrew et al.'s b: the update was not clipped
        likes: list[Message | None] = [*replies, *[None] * (sampled - len(replies))]
        copies = [_reply(ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, upd)}), m, like)
                  for upd, m, like in zip(updates, metrics, likes)]
        wrapper = self._wrapper(kind, sampled)
        if kind == "server":
            wrapper.current_arrays = ArrayRecord({k: Array(np.asarray(c)) for k, c in zip(keys, base)})
        if kind == "adaptive":
            wrapper.clipping_norm = C
        with seeded_numpy([self.config.seed, NOISE_STREAM, server_round]):
            arrays, _ = wrapper.aggregate_train(server_round, copies)
            if arrays is None:
                raise RuntimeError("Flower's DP wrapper returned no aggregate (see its log)")
        if kind == "adaptive":
            self.clipping_norm = float(wrapper.clipping_norm)
        return arrays, Release(server_round, mechanism, self.config.privacy.noise_multiplier, C, sampled, replied=len(replies))


# ---- the mechanism (client) ----------------------------------------------------------------
def clip_shared_update(new_shared: State, reference_shared: State, clipping_norm: float) -> State:
    """``new_shared`` with its update (``new - reference``, over all its keys together) clipped to
    L2 norm ``clipping_norm`` with Flower's ``compute_clip_model_update``, as ``fixedclipping_mod``
    does. ``reference_shared``: the shared part as the client received it (``Request.shared``), so
    the server measures the same update. An update already inside the ball comes back unchanged
    (the same tensors); a clipped one comes back in float32 (what it travels as)."""
    missing = [k for k in new_shared if k not in reference_shared]
    if missing:
        raise KeyError(f"clip_shared_update: keys without a reference value: {missing[:3]}")
    keys = list(new_shared)
    as_np = lambda t: t.detach().to("cpu", torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()  # noqa: E731
    new, ref = [as_np(new_shared[k]).copy() for k in keys], [as_np(reference_shared[k]) for k in keys]
    if get_norm([n - r for n, r in zip(new, ref)]) <= clipping_norm:
        return dict(new_shared)
    compute_clip_model_update(new, ref, clipping_norm)
    return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, new)}

