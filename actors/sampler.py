"""Sampler actor: the generation module with the current policy weights.

A plain class (the driver makes it remote with the configured resources and restarts). New weights
arrive by :meth:`SamplerActor.receive` (or, with ``cluster.weight_transport: shm``, a descriptor of a
shared-memory file by :meth:`SamplerActor.receive_shm`), pushed by the driver (:mod:`cluster.push`); before each batch
:meth:`SamplerActor.sample` pulls from the weight store only when it is ``PULL_LAG`` versions behind
(a start, a restart, lost pushes). It generates images and their clean x0 latents
(:func:`actors.rollout.generate`). The driver calls it with
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
from actors.shm_layout import ShmDescriptor
from actors.shm_weights import ShmReader, receive_shm
from actors.weights import as_tensors, maybe_sync
from core.metrics import Metric, Metrics
from core.prompt_sets import PromptRecord
from core.records import SampleHeader
from learner.base import SampleBatch

PULL_LAG = 2  # pull from the weight store only this many versions behind (pushes bring each new one)


class SamplerActor:
    def __init__(self, components: Components, sampler_id: str, weight_store: Any = None):
        self.sampler_id = sampler_id
        self.store = weight_store
        self.policy = components.policy()
        self.metrics = Metrics({"actor": sampler_id})
        self.last_lag = 0
        self.shared = False  # CPU parameters map object-store memory (read-only: never copy into them)
        self.shm_reader: ShmReader | None = None
        self.shm_failures = 0
        self.pull_next = False  # a pushed version could not be read: pull at the next batch, however little behind
        self._sync()

    def _sync(self, min_version: int | None = None) -> None:
        if self.store is None:
            return
        # the driver pushes every new version (receive); the store is for a start, a restart, a lost push
        behind = min_version is not None and self.policy.version < min_version  # rounds: the round's weights
        behind, self.pull_next = behind or self.pull_next, False
        result = maybe_sync(self.store, self.policy.version, self._load, min_lag=1 if behind else PULL_LAG)
        if result.synced:
            self.metrics.observe(Metric.WEIGHT_SYNC_TIME, result.seconds)
        if result.failed:
            self.metrics.inc(Metric.WEIGHT_SYNC_FAILURES, 1)
        self.last_lag = result.lag
        self.metrics.set(Metric.VERSION_LAG, self.last_lag)

    def sample(self, prompts: Sequence[PromptRecord], seeds: Sequence[int],
               min_version: int | None = None) -> tuple[SampleHeader, SampleBatch]:
        """Sync, then one image per (prompt, seed) with the current weights (call with ``num_returns=2``).
        ``min_version`` (rounds mode): pull first when behind it, however little."""
        self._sync(min_version)
        header, batch = generate(self.policy, prompts, seeds, self.sampler_id, lag=self.last_lag)
        self.metrics.observe(Metric.SAMPLER_BATCH_TIME, header.sample_seconds)
        self.metrics.inc(Metric.IMAGES_GENERATED, header.n)
        return header, batch

    def receive(self, state: Mapping[str, Any], version: int) -> int:
        """Load pushed weights (the driver passes the learner's object: numpy arrays mapped from the object
        store, or tensors Ray Direct Transport moved from the learner). A version it already has is skipped."""
        if version != self.policy.version:
            self._load(as_tensors(state), version)
            self.last_lag = 0
            self.metrics.set(Metric.VERSION_LAG, 0)
        return self.policy.version

    def receive_shm(self, desc: ShmDescriptor) -> int:
        """Load a pushed version from the learner's shared-memory file ``desc``. On another node nothing is
        loaded and the next batch pulls it from the store; a file it cannot read is a counted failure: the
        weights stay (torn: they are mixed and marked version -1) and the next batch pulls."""
        import ray

        if self.shm_reader is None:
            self.shm_reader = ShmReader()
        receipt = receive_shm(self.shm_reader, desc, self.policy.version, ray.get_runtime_context().get_node_id(),
                              self._load_copy)
        if receipt.error is not None:
            self.shm_failures += 1
            self.metrics.inc(Metric.WEIGHT_SYNC_FAILURES, 1)
        if receipt.via == "torn":
            self.policy.version = -1  # mixed weights: any store version is newer
        self.pull_next = receipt.via in ("remote", "torn") or receipt.error is not None
        if receipt.via == "shm":
            self.last_lag = 0
            self.metrics.set(Metric.VERSION_LAG, 0)
        return self.policy.version

    def _load(self, state: Mapping[str, Any], version: int) -> None:
        # a sampler never writes its weights: CPU ones share the object store's memory instead of a copy
        self.policy.load_trainable_state(state, version, share=True)
        self.shared = True

    @torch.no_grad()
    def _load_copy(self, state: Mapping[str, Any], version: int) -> None:
        """Copy ``state`` (views of a shared-memory file) into parameters of the sampler's own memory."""
        if self.shared:  # they map object-store memory: give them their own first (once)
            for p in self.policy.named_trainable_parameters().values():
                if p.device.type == "cpu":
                    p.data = torch.empty_like(p.data)
            self.shared = False
        self.policy.load_trainable_state(state, version)

    def get_metrics(self) -> dict[str, Any]:
        """Identity, weight version and lag, and the metrics snapshot (images, batch times, syncs)."""
        return {"actor": self.sampler_id, "version": self.policy.version, "lag": self.last_lag,
                "shm_failures": self.shm_failures, **self.metrics.snapshot()}

    def ping(self) -> str:
        return self.sampler_id

    def stop(self) -> dict[str, Any]:
        return self.get_metrics()
