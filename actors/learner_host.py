"""Learner host actor: runs the SRUM learner on batches drawn from the replay buffer, publishes weights
every `learner.sync_every` steps and checkpoints every `learner.checkpoint_every` steps.

A plain class (the driver makes it remote on a GPU node with `max_restarts`). On (re)start it resumes
from the run's latest checkpoint when there is one, then publishes its weights, so samplers re-sync.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import ray
import torch

from cluster import metrics as M
from cluster.config import SRUMConfig
from cluster.weights import publish_state
from learner.checkpoint import find_latest, load_checkpoint, save_checkpoint
from learner.learner import Learner
from learner.policy import Policy

log = logging.getLogger("srum.learner_host")


class LearnerHost:
    def __init__(self, cfg: SRUMConfig, run_dir: str, buffer: Any, weight_store: Any):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.buffer = buffer
        self.store = weight_store
        self.policy = Policy.from_config(cfg.policy, seed=cfg.run.seed)
        self.learner = Learner(cfg, self.policy)
        self.metrics = M.Metrics()
        self.lost_samples = 0
        self.resumed_from: str | None = None
        if find_latest(self.ckpt_dir) is not None:
            self.resumed_from = str(load_checkpoint(self.ckpt_dir, self.learner))
            log.info("resumed from %s at step %d", self.resumed_from, self.learner.step)
        self._last_published = -1
        self.publish()

    # ------------------------------------------------------------------ weights
    def publish(self) -> int:
        version, state = self.policy.trainable_state()
        if version != self._last_published:
            # allow_rollback: a restarted learner resumes from a checkpoint older than what it last published
            seconds = publish_state(self.store, version, state, allow_rollback=True)
            self.metrics.observe(M.WEIGHT_SYNC_SECONDS, seconds, {"actor": "learner"})
            self.metrics.set(M.POLICY_VERSION, version)
            self._last_published = version
        return version

    # ------------------------------------------------------------------ training
    def _draw(self, timeout_s: float) -> list[dict[str, Any]] | None:
        """Draw one batch of records from the buffer (waits until enough are there, or gives up)."""
        need = self.cfg.learner.batch_size
        deadline = time.monotonic() + timeout_s
        records: list[dict[str, Any]] = []
        while len(records) < need:
            entries = ray.get(self.buffer.sample.remote(need - len(records), self.policy.version))
            for entry in entries:
                try:
                    records.append(ray.get(entry.ref, timeout=30))
                except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError, ray.exceptions.GetTimeoutError):
                    self.lost_samples += 1
                    ray.get(self.buffer.mark_lost.remote(1))
            if len(records) < need:
                if time.monotonic() > deadline:
                    if records:  # give back nothing: what was drawn is trained now rather than lost
                        break
                    return None
                time.sleep(0.02)
        return records

    def run(self, n_steps: int, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Up to `n_steps` learner steps; returns one metrics dict per step done (fewer when the buffer stays
        short of a batch for `timeout_s`)."""
        out = []
        for _ in range(n_steps):
            records = self._draw(timeout_s)
            if records is None:
                break
            batch = {
                "prompts": [r["meta"].prompt for r in records],
                "x0": torch.stack([r["x0"] for r in records]),
                "R": torch.stack([r["R"] for r in records]),
                "alpha": torch.tensor([r["alpha"] for r in records], dtype=torch.float32),
            }
            stats = self.learner.train_step(batch)
            stats.update(
                step=self.learner.step,
                mean_global_score=_mean([r["meta"].global_score for r in records]),
                mean_alpha=float(batch["alpha"].mean()),
                mean_R=float(batch["R"].mean()),
                mean_lag=_mean([self.policy.version - r["meta"].policy_version for r in records]),
            )
            self._record_metrics(stats)
            if self.learner.step % self.cfg.learner.sync_every == 0:
                self.publish()
            every = self.cfg.learner.checkpoint_every
            if every and self.learner.step % every == 0:
                self.checkpoint()
            stats["policy_version"] = self.policy.version
            out.append(stats)
        return out

    def _record_metrics(self, stats: dict[str, Any]) -> None:
        m, tags = self.metrics, {"actor": "learner"}
        m.inc(M.SAMPLES_TRAINED, stats.get("samples", 0))
        m.inc(M.LEARNER_STEPS, 1)
        m.observe(M.LEARNER_STEP_SECONDS, stats.get("step_time_s", 0.0))
        for name, key in ((M.LEARNER_LOSS, "loss"), (M.LEARNER_LOSS_R, "l_r"), (M.LEARNER_LOSS_REF, "l_ref"),
                          (M.LEARNER_GRAD_NORM, "grad_norm")):
            if stats.get(key) is not None:
                m.set(name, stats[key])
        if stats.get("mean_global_score") is not None:
            m.set(M.REWARD_GLOBAL_SCORE, stats["mean_global_score"], tags)
        m.set(M.REWARD_ALPHA, stats["mean_alpha"], tags)
        m.set(M.REWARD_MEAN_R, stats["mean_R"], tags)
        m.set(M.POLICY_VERSION, self.policy.version)

    def evaluate(self) -> dict[str, Any]:
        """Held-out accuracy of the current weights by the world's independent evaluator (shapes world)."""
        from shapes.pretrain import heldout_accuracy

        t0 = time.perf_counter()
        acc = heldout_accuracy(self.policy, seeds_per_prompt=self.cfg.run.eval_seeds,
                               split_seed=self.cfg.policy.shapes_split_seed,
                               guidance=self.cfg.policy.eval_guidance_scale)  # None: the policy's own
        return {"step": self.learner.step, "policy_version": self.policy.version, **acc,
                "eval_seconds": time.perf_counter() - t0}

    def checkpoint(self) -> str:
        path = save_checkpoint(self.ckpt_dir, self.learner)
        return str(path)

    def get_metrics(self) -> dict[str, Any]:
        return {"step": self.learner.step, "policy_version": self.policy.version, "lost_samples": self.lost_samples,
                "skipped_steps": self.learner.skipped_steps, "resumed_from": self.resumed_from}

    def ping(self) -> int:
        return self.learner.step

    def stop(self) -> dict[str, Any]:
        """Final checkpoint and last publish; returns the final metrics."""
        self.publish()
        self.checkpoint()
        return self.get_metrics()


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return float(sum(values) / len(values)) if values else None
