"""Learner host actor: trains the SRUM learner on the batches the driver draws from the replay buffer,
publishes weights every ``learner.sync_every`` steps, checkpoints every ``learner.checkpoint_every``
steps and runs the world's held-out evaluation.

A plain class (the driver makes it remote on a GPU node with ``max_restarts``). :meth:`LearnerHost.train`
takes whole batches of :class:`~core.records.TrainSample` whose tensors are object references and fetches
all of them with one ``ray.get``. On (re)start it resumes from the run's latest checkpoint when there is
one, then publishes its weights, so samplers re-sync. With ``cluster.weight_transport: shm`` it publishes
into a pair of shared-memory files (:mod:`actors.shm_weights`, a new pair per process) and hands the
driver a descriptor to push, the object store serving whatever that path cannot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.components import Components
from actors.shm_layout import ShmDescriptor
from actors.shm_weights import ShmWriter, publish_store_copy
from actors.weights import publish_state
from core.metrics import Metric, Metrics
from core.records import TrainSample, collate
from learner.checkpoint import find_latest
from learner.learner import Learner

log = logging.getLogger("srum.learner_host")

FETCH_TIMEOUT_S = 60.0  # a sample's tensors that cannot be fetched in this time are counted lost


@dataclass
class LearnResult:
    """What one :meth:`LearnerHost.train` call did: one stats dict per applied step and the ids trained in
    it, and the ids of drawn samples that were lost (their tensors could not be fetched; the driver
    accounts them)."""

    steps: list[dict[str, Any]]
    lost: list[str]
    published: tuple[int, list[Any]] | None = None
    """The last version this call published and ``[its object ref]`` (for the driver to push; ``[]`` when
    it went into a shm file: ``shm``)."""
    step_ids: list[list[str]] = field(default_factory=list)
    """Per entry of ``steps``: the sample ids it trained on (to account a rollback)."""
    shm: ShmDescriptor | None = None
    """``published``'s shared-memory file (``weight_transport: shm``; None: it went through the object store)."""
    shm_fallbacks: int = 0
    """Versions of this call that the shm transport could not carry (its idle file still being read)."""


class LearnerHost:
    def __init__(self, components: Components, run_dir: str, weight_store: Any):
        cfg = components.cfg
        self.cfg = cfg
        self.ckpt_dir = Path(run_dir) / "checkpoints"
        self.store = weight_store
        self.policy = components.policy()
        self.learner = Learner(cfg, self.policy)
        self.evaluator = components.evaluator() if cfg.run.eval_every else None
        self.metrics = Metrics({"actor": "learner"})
        self.resumed_from: str | None = None
        self.service: dict[str, Any] | None = None  # the driver's data cursor and counters, kept with checkpoints
        if find_latest(self.ckpt_dir) is not None:  # falls back to the newest complete one, or raises
            self.resumed_from = str(self.learner.resume(self.ckpt_dir))
            self.service = self.learner.resumed_service
            log.info("resumed from %s at step %d", self.resumed_from, self.learner.step)
        self._last_published = -1
        self._published: tuple[int, list[Any]] | None = None
        self._ack: Any = None  # the store's pending answer to the last publication
        self.shm: ShmWriter | None = None
        if cfg.cluster.weight_transport == "shm":
            self.shm = ShmWriter(cfg.run.name, node_id=ray.get_runtime_context().get_node_id())
        self._shm_desc: ShmDescriptor | None = None
        self.publish()

    # ------------------------------------------------------------------ weights
    def publish(self, pushed: bool = False) -> int:
        """Publish the current version unless it was. ``pushed`` (from ``train``: the driver pushes it): a
        version that goes into a shm file is left to the driver to put in the store (:mod:`cluster.push`)."""
        version = self.policy.version
        if version != self._last_published:
            # allow_rollback: a restarted learner resumes from a checkpoint older than what it last published
            if self._ack is not None:  # the previous publication's answer (a refused version is a bug: raise)
                ray.get(self._ack)
            t0 = time.perf_counter()
            params = self.policy.named_trainable_parameters()
            desc = self.shm.write(params, version) if self.shm is not None else None
            if desc is not None and pushed:
                self._published, self._shm_desc, self._ack = (version, []), desc, None
                seconds = time.perf_counter() - t0
            elif desc is not None:  # not pushed: the store gets a reference that resolves once a task copied it
                ref, self._ack = publish_store_copy(self.store, desc)
                self.shm.lease(version, [ref])
                self._published, self._shm_desc = (version, [ref]), None
                seconds = time.perf_counter() - t0
            else:
                pub = publish_state(self.store, version, self.policy.trainable_state()[1], allow_rollback=True,
                                    wait=False)
                self._published, self._ack, self._shm_desc = (version, [pub.payload]), pub.ack, None
                seconds = pub.seconds
            self.metrics.observe(Metric.WEIGHT_SYNC_TIME, seconds)
            self.metrics.set(Metric.POLICY_VERSION, version)
            self._last_published = version
        return version

    # ------------------------------------------------------------------ training
    def train(self, batches: Sequence[Sequence[TrainSample]], service: dict[str, Any] | None = None,
              publish: bool | None = None, leases: dict[int, list[Any]] | None = None) -> LearnResult:
        """One learner step per batch (tensors by reference, all fetched at once); ``service`` is the driver's
        state (data cursor, counters) as of this draw, stored with the next checkpoint. ``publish``: None =
        every ``learner.sync_every`` steps; True = once, after the last step (rounds mode's end of a pool);
        False = not in this call. ``leases``: {version: [the driver's pushes of its shm file]}, not rewritten
        until they returned."""
        if service is not None:
            self.service = service
        if self.shm is not None:
            for version, refs in (leases or {}).items():
                self.shm.lease(version, refs)
        fallbacks = self.shm.fallbacks if self.shm is not None else 0
        fetched, lost = _fetch([s for b in batches for s in b])
        self._published, self._shm_desc = None, None
        out, ids = [], []
        for batch in batches:
            samples = [fetched[s.sample_id] for s in batch if s.sample_id in fetched]
            if not samples:
                continue
            stats = self.learner.train_step(collate(samples))
            records = [s.record for s in samples]
            stats.update(
                step=self.learner.step,
                mean_global_score=_mean([r.global_score for r in records]),
                mean_alpha=_mean([r.alpha for r in records]),
                mean_R=_mean([r.mean_R for r in records]),
                mean_lag=_mean([self.policy.version - r.policy_version for r in records]),
            )
            self._record_metrics(stats)
            if publish is None and self.learner.step % self.cfg.learner.sync_every == 0:
                self.publish(pushed=True)
            every = self.cfg.learner.checkpoint_every
            if every and self.learner.step % every == 0:
                self.checkpoint()
            stats["policy_version"] = self.policy.version
            out.append(stats)
            ids.append([r.sample_id for r in records])
        if publish and out:
            self.publish(pushed=True)
        fallbacks = self.shm.fallbacks - fallbacks if self.shm is not None else 0
        return LearnResult(out, lost, self._published, ids, self._shm_desc, fallbacks)

    def _record_metrics(self, stats: dict[str, Any]) -> None:
        m = self.metrics
        m.inc(Metric.SAMPLES_TRAINED, stats["samples"])
        m.inc(Metric.LEARNER_STEPS, 1)
        m.observe(Metric.LEARNER_STEP_TIME, stats["step_time_s"])
        for name, key in ((Metric.LEARNER_LOSS, "loss"), (Metric.LEARNER_LOSS_R, "l_r"),
                          (Metric.LEARNER_LOSS_REF, "l_ref"), (Metric.LEARNER_GRAD_NORM, "grad_norm"),
                          (Metric.REWARD_GLOBAL_SCORE, "mean_global_score"), (Metric.REWARD_ALPHA, "mean_alpha"),
                          (Metric.REWARD_MEAN_R, "mean_R")):
            m.set(name, stats[key])
        m.set(Metric.POLICY_VERSION, self.policy.version)

    def evaluate(self) -> dict[str, Any]:
        """Held-out accuracy of the current weights by the world's independent evaluator."""
        if self.evaluator is None:
            raise RuntimeError("no evaluator: run.eval_every is 0 or the world has none")
        t0 = time.perf_counter()
        acc = self.evaluator.evaluate(self.policy)
        return {"step": self.learner.step, "policy_version": self.policy.version, **acc,
                "eval_seconds": time.perf_counter() - t0}

    def checkpoint(self) -> str:
        return str(self.learner.checkpoint(self.ckpt_dir, self.service))

    def get_metrics(self) -> dict[str, Any]:
        return {"step": self.learner.step, "policy_version": self.policy.version,
                "skipped_steps": self.learner.skipped_steps, "resumed_from": self.resumed_from,
                **self.metrics.snapshot()}

    def ping(self) -> int:
        return self.learner.step

    def weights(self) -> dict[str, Any]:
        """A copy of the trainable tensors, on the learner's device: called with ``.options(tensor_transport=
        "gloo" | "nccl")`` it becomes a Ray Direct Transport object the samplers receive without the object
        store (a copy, because RDT objects are references and the optimiser updates the weights in place)."""
        return {k: p.detach().clone() for k, p in self.policy.named_trainable_parameters().items()}

    def info(self) -> dict[str, Any]:
        """Where the learner stands: step and version (after a restart, the checkpoint's), where it resumed
        from, and the service data stored with that checkpoint."""
        return {"step": self.learner.step, "policy_version": self.policy.version, "resumed_from": self.resumed_from,
                "service": self.service}

    def stop(self) -> dict[str, Any]:
        """Final checkpoint and last publish; removes the shm files; returns the final metrics."""
        self.publish()
        self.checkpoint()
        if self.shm is not None:
            self.shm.close()
        return self.get_metrics()


def _fetch(samples: list[TrainSample]) -> tuple[dict[str, TrainSample], list[str]]:
    """Resolve every sample's tensors: one ``ray.get`` for all refs; when that fails (an object was lost),
    one get per ref to find the lost ones. Returns ({sample_id: resolved sample}, ids of the lost ones)."""
    samples = list({s.sample_id: s for s in samples}.values())  # one fetch per sample served in several batches
    refs = [s.tensors for s in samples if isinstance(s.tensors, ray.ObjectRef)]
    try:
        values = iter(ray.get(refs, timeout=FETCH_TIMEOUT_S) if refs else [])
        return {s.sample_id: (TrainSample(s.record, next(values)) if isinstance(s.tensors, ray.ObjectRef) else s)
                for s in samples}, []
    except ray.exceptions.RayError:
        pass
    out: dict[str, TrainSample] = {}
    for s in samples:
        try:
            tensors = ray.get(s.tensors, timeout=FETCH_TIMEOUT_S) if isinstance(s.tensors, ray.ObjectRef) else s.tensors
        except ray.exceptions.RayError as exc:
            log.warning("sample %s lost before training: %s", s.sample_id, type(exc).__name__)
            continue
        out[s.sample_id] = TrainSample(s.record, tensors)
    return out, [s.sample_id for s in samples if s.sample_id not in out]


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None
