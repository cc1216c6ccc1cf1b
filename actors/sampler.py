"""Sampler actor: the generation module with the current policy weights.

A plain class (the driver makes it remote with the configured resources and restarts). Each
:meth:`SamplerActor.sample` first syncs weights when the published version is newer, then generates
images and their clean x0 latents (:func:`actors.rollout.generate`). The driver calls it with
``num_returns=2``: the small :class:`~core.records.SampleHeader` comes back to the driver, the
:class:`~learner.base.SampleBatch` stays in the object store and goes to a scorer by reference. A
restarted sampler starts from the base model and syncs to the latest published weights before its
first batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from actors.components import Components
from actors.rollout import generate
from actors.weights import maybe_sync
from core.metrics import Metric, Metrics
from core.prompt_sets import PromptRecord
from core.records import SampleHeader
from learner.base import SampleBatch


class SamplerActor:
    def __init__(self, components: Components, sampler_id: str, weight_store: Any = None):
        self.sampler_id = sampler_id
        self.store = weight_store
        self.policy = components.policy()
        self.metrics = Metrics({"actor": sampler_id})
        self.last_lag = 0
        self._sync()

    def _sync(self) -> None:
        if self.store is None:
            return
        result = maybe_sync(self.store, self.policy.version, self.policy.load_trainable_state)
        if result.synced:
            self.metrics.observe(Metric.WEIGHT_SYNC_TIME, result.seconds)
        if result.failed:
            self.metrics.inc(Metric.WEIGHT_SYNC_FAILURES, 1)
        self.last_lag = result.lag
        self.metrics.set(Metric.VERSION_LAG, self.last_lag)

    def sample(self, prompts: Sequence[PromptRecord], seeds: Sequence[int]) -> tuple[SampleHeader, SampleBatch]:
        """Sync, then one image per (prompt, seed) with the current weights (call with ``num_returns=2``)."""
        self._sync()
        header, batch = generate(self.policy, prompts, seeds, self.sampler_id, lag=self.last_lag)
        self.metrics.observe(Metric.SAMPLER_BATCH_TIME, header.sample_seconds)
        self.metrics.inc(Metric.IMAGES_GENERATED, header.n)
        return header, batch

    def set_weights(self, state: Mapping[str, torch.Tensor], version: int) -> int:
        """Load trainable weights directly (tests)."""
        self.policy.load_trainable_state(state, version)
        return self.policy.version

    def get_metrics(self) -> dict[str, Any]:
        """Identity, weight version and lag, and the metrics snapshot (images, batch times, syncs)."""
        return {"actor": self.sampler_id, "version": self.policy.version, "lag": self.last_lag,
                **self.metrics.snapshot()}

    def ping(self) -> str:
        return self.sampler_id

    def stop(self) -> dict[str, Any]:
        return self.get_metrics()
