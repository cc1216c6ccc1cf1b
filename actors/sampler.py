"""Sampler actor: the generation module with the current policy weights.

A plain class (the driver makes it remote with the configured resources and restarts). Each `sample()`
first syncs weights when the published version is newer, then generates images and their clean x0
latents. A restarted sampler starts from the base model and syncs to the latest published weights
before its first batch.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cluster import metrics as M
from cluster.config import SRUMConfig
from cluster.prompt_sets import PromptRecord
from cluster.weights import maybe_sync
from learner.policy import Policy

log = logging.getLogger("srum.sampler")


class SamplerActor:
    def __init__(self, cfg: SRUMConfig, sampler_id: str, weight_store: Any = None):
        self.cfg = cfg
        self.sampler_id = sampler_id
        self.store = weight_store
        self.policy = Policy.from_config(cfg.policy, seed=cfg.run.seed)
        self.version = self.policy.version
        self.metrics = M.Metrics()
        self.counts = {"batches": 0, "images": 0, "syncs": 0, "sync_failures": 0}
        self.last_lag = 0
        self.sync_seconds = 0.0
        self._sync()

    def _sync(self) -> None:
        if self.store is None:
            return
        result = maybe_sync(self.store, self.version, self.policy.load_trainable_state)
        if result.synced:
            self.counts["syncs"] += 1
            self.sync_seconds += result.seconds
            self.metrics.observe(M.WEIGHT_SYNC_SECONDS, result.seconds, {"actor": self.sampler_id})
        if result.failed:
            self.counts["sync_failures"] += 1
            self.metrics.inc(M.WEIGHT_SYNC_FAILURES, 1, {"actor": self.sampler_id})
        self.version = int(result)
        self.last_lag = max(0, result.latest_version - self.version)
        self.metrics.set(M.ACTOR_VERSION_LAG, self.last_lag, {"actor": self.sampler_id})

    def sample(self, prompts: list[PromptRecord], seeds: list[int]) -> dict[str, Any]:
        """Generate one image per prompt with the current weights. Returns a dict with the SampleBatch
        ("batch"), the prompt records, the policy version that produced it and timings."""
        self._sync()
        t0 = time.perf_counter()
        batch = self.policy.sample([p.text for p in prompts], seeds)
        seconds = time.perf_counter() - t0
        self.metrics.observe(M.SAMPLER_BATCH_SECONDS, seconds, {"actor": self.sampler_id})
        self.counts["batches"] += 1
        self.counts["images"] += len(prompts)
        self.metrics.inc(M.IMAGES_GENERATED, len(prompts), {"actor": self.sampler_id})
        return {
            "batch": batch,
            "prompts": prompts,
            "policy_version": self.version,
            "sampler_id": self.sampler_id,
            "lag": self.last_lag,
            "sample_seconds": seconds,
        }

    def set_weights(self, state: dict, version: int) -> int:
        """Load trainable weights directly (used in tests and the in-process path)."""
        self.policy.load_trainable_state(state, version)
        self.version = version
        return self.version

    def get_metrics(self) -> dict[str, Any]:
        return {"actor": self.sampler_id, "version": self.version, "lag": self.last_lag,
                "sync_seconds": self.sync_seconds, **self.counts}

    def ping(self) -> str:
        return self.sampler_id

    def stop(self) -> dict[str, Any]:
        return self.get_metrics()
