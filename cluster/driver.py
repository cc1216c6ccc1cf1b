"""The online SRUM loop, driver side: creates the actors, keeps a bounded amount of work in flight,
routes sampled batches to scorers and scored samples into the replay buffer, keeps the learner busy,
applies scale requests, reports progress, and stops cleanly (drain, final checkpoint, plots, gallery).

Phases of one loop turn, top to bottom in `_turn`: scale -> submit samples -> submit learner work ->
wait for anything to finish -> handle it -> report.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import ray

from actors.learner_host import LearnerHost
from actors.sampler import SamplerActor
from actors.scorer import ScorerActor
from cluster import metrics as M
from cluster.buffer import ReplayBuffer
from cluster.config import SRUMConfig, config_hash, config_to_yaml
from cluster.control import get_or_create_controller
from cluster.pool import ActorPool
from cluster.progress import Gallery, ProgressReporter, plot_metrics
from cluster.prompt_sets import PromptRecord, load_prompt_source
from cluster.records import BufferEntry, SampleMeta
from cluster.weights import WeightStore

log = logging.getLogger("srum.driver")
NAMESPACE = "srum"


class PromptCycler:
    """Endless, seeded walk over the prompt set (reshuffled each epoch) with a unique seed per image."""

    def __init__(self, prompts: list[PromptRecord], seed: int, shuffle: bool = True):
        self.prompts, self.shuffle = list(prompts), shuffle
        self.rng = random.Random(seed)
        self.order: deque[PromptRecord] = deque()
        self.counter = seed * 1_000_003

    def take(self, n: int) -> tuple[list[PromptRecord], list[int]]:
        out = []
        while len(out) < n:
            if not self.order:
                epoch = list(self.prompts)
                if self.shuffle:
                    self.rng.shuffle(epoch)
                self.order.extend(epoch)
            out.append(self.order.popleft())
        seeds = list(range(self.counter, self.counter + n))
        self.counter += n
        return out, seeds


def connect_ray(cfg: SRUMConfig) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS) or `cluster.address`, else start a local Ray on
    loopback with its dashboard on 127.0.0.1."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}}
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
        return
    kwargs: dict[str, Any] = {}
    if cfg.cluster.metrics_port is not None:
        kwargs["_metrics_export_port"] = cfg.cluster.metrics_port
    # address="local": always a new local Ray (a bare ray.init() would join whatever `ray start` left behind)
    ray.init(address="local", namespace=NAMESPACE, runtime_env=env, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", configure_logging=False, **kwargs)


class Driver:
    def __init__(self, cfg: SRUMConfig):
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
        self.reporter = ProgressReporter(self.run_dir)
        self.gallery = Gallery(self.run_dir)
        self.prompts = PromptCycler(load_prompt_source(cfg.cluster.prompts, cfg.run.seed), cfg.run.seed,
                                    cfg.cluster.prompts.shuffle)
        self.stop_reason: str | None = None
        self.pending: dict[Any, tuple[str, str, Any]] = {}  # ref -> (kind, actor_id, payload)
        self.waiting_for_scorer: deque[tuple[Any, int]] = deque()
        self.counts: Counter[str] = Counter()
        self.judge_counters: dict[str, dict[str, Any]] = {}
        self.last_train: dict[str, Any] = {}
        self.step = 0
        self.policy_version = 0
        self.lags: dict[str, int] = {}
        self.sampler_versions: dict[str, int] = {}
        self.last_eval: dict[str, Any] | None = None  # the latest held-out evaluation (shapes world)
        self.last_eval_step: int | None = None

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        cfg = self.cfg
        if cfg.policy.kind == "shapes":  # pretrain (or find) the cached base once here, not in every actor
            from shapes.pretrain import pretrain_base, settings_from_config

            print("srum: shapes world: preparing the pretrained base model (cached after the first run)", flush=True)
            pretrain_base(*settings_from_config(cfg.policy))
        connect_ray(cfg)
        self.metrics = M.Metrics()
        self.controller = get_or_create_controller(NAMESPACE, samplers=cfg.cluster.num_samplers,
                                                   scorers=cfg.cluster.num_scorers)
        ray.get(self.controller.reset.remote(cfg.cluster.num_samplers, cfg.cluster.num_scorers, cfg.run.name))
        self.buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(
            cfg.cluster.buffer_capacity, cfg.cluster.max_staleness, cfg.cluster.recency_bias, cfg.run.seed)
        self.store = ray.remote(WeightStore).options(num_cpus=0).remote()
        res = cfg.cluster.learner_resources
        self.learner = ray.remote(LearnerHost).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=cfg.cluster.max_restarts,
        ).remote(cfg, str(self.run_dir), self.buffer, self.store)
        self.step = ray.get(self.learner.ping.remote())  # waits for the build (and a resume, if any)
        self.start_step = self.step
        if cfg.run.eval_every:
            self._on_eval_result(ray.get(self.learner.evaluate.remote()))  # the starting point
        restarts = cfg.cluster.max_restarts
        sres, cres = cfg.cluster.sampler_resources, cfg.cluster.scorer_resources
        # named (srum-<run>-<role>-<i>) so operators and tests can find a given actor
        self.samplers = ActorPool("sampler", lambda aid: ray.remote(SamplerActor).options(
            name=f"srum-{cfg.run.name}-{aid}", num_cpus=sres.num_cpus, num_gpus=sres.num_gpus,
            max_restarts=restarts,
        ).remote(cfg, aid, self.store), max_in_flight_per_actor=2)
        self.scorers = ActorPool("scorer", lambda aid: ray.remote(ScorerActor).options(
            name=f"srum-{cfg.run.name}-{aid}", num_cpus=cres.num_cpus, num_gpus=cres.num_gpus,
            max_restarts=restarts, max_concurrency=8,
        ).remote(cfg, aid), max_in_flight_per_actor=4)
        self.samplers.scale_to(cfg.cluster.num_samplers)
        self.scorers.scale_to(cfg.cluster.num_scorers)
        ray.get([m.handle.start.remote() for m in self.scorers.active])  # judge health check: fail fast
        self.reporter.log({"kind": "start", "config_hash": config_hash(cfg), "run_dir": str(self.run_dir),
                           "resumed_at_step": self.step})
        print(f"srum: run '{cfg.run.name}' -> {self.run_dir} (ray dashboard: "
              f"{ray.get_runtime_context().gcs_address if ray.is_initialized() else '-'})", flush=True)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        self.start()
        self.t_start = time.monotonic()
        self._last_scale_check = 0.0
        try:
            while self.stop_reason is None:
                self._turn()
        finally:
            summary = self.finish()
        return summary

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def _turn(self) -> None:
        self._check_budget()
        self._apply_scale()
        self._submit_samples()
        self._submit_learner()
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
        for ref in ready:
            kind, actor_id, payload = self.pending.pop(ref)
            getattr(self, f"_on_{kind}")(ref, actor_id, payload)
        self._report()

    def _check_budget(self) -> None:
        if self.step >= self.cfg.run.max_steps:
            self.request_stop("max_steps")
        elif self.cfg.run.max_seconds and time.monotonic() - self.t_start > self.cfg.run.max_seconds:
            self.request_stop("max_seconds")

    def _apply_scale(self) -> None:
        now = time.monotonic()
        if now - self._last_scale_check < 1.0:
            return
        self._last_scale_check = now
        want = ray.get(self.controller.get_desired.remote())
        if want.get("stop"):
            self.request_stop("stop requested")
        for pool, n in ((self.samplers, want["samplers"]), (self.scorers, want["scorers"])):
            if n != pool.size():
                added, draining = pool.scale_to(n)
                self.reporter.log({"kind": "scale", "role": pool.role, "to": n, "added": added, "draining": draining})
        self.samplers.reap()
        self.scorers.reap()

    def _in_flight_batches(self) -> int:
        return sum(kind in ("sample", "score") for kind, _, _ in self.pending.values()) + len(self.waiting_for_scorer)

    def _submit_samples(self) -> None:
        n = self.cfg.cluster.sample_batch_size
        while self._in_flight_batches() < self.cfg.cluster.max_in_flight_batches:
            member = self.samplers.pick()
            if member is None:
                break
            prompts, seeds = self.prompts.take(n)
            self.samplers.started(member)
            self.pending[member.handle.sample.remote(prompts, seeds)] = ("sample", member.actor_id, n)
        while self.waiting_for_scorer:
            member = self.scorers.pick()
            if member is None:
                break
            sample_ref, n = self.waiting_for_scorer.popleft()
            self.scorers.started(member)
            refs = member.handle.score_batch.options(num_returns=1 + n).remote(sample_ref)
            refs = refs if isinstance(refs, list) else [refs]
            self.pending[refs[0]] = ("score", member.actor_id, (refs[1:], n))

    def _submit_learner(self) -> None:
        if any(kind in ("learn", "eval") for kind, _, _ in self.pending.values()):
            return
        every = self.cfg.run.eval_every
        if every and self.step // every > (self.last_eval_step or 0) // every:
            self.last_eval_step = self.step
            self.pending[self.learner.evaluate.remote()] = ("eval", "learner", None)
            return
        remaining = self.cfg.run.max_steps - self.step
        if remaining > 0 and self.stop_reason is None:
            chunk = min(remaining, max(1, self.cfg.learner.sync_every))
            self.pending[self.learner.run.remote(chunk, 5.0)] = ("learn", "learner", chunk)

    # ------------------------------------------------------------------ completions
    def _on_sample(self, ref: Any, actor_id: str, n: int) -> None:
        try:
            header = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.counts["sampler_failures"] += 1
            log.warning("sampler %s failed a batch (%s); it restarts and re-syncs", actor_id, type(exc).__name__)
            self.samplers.finished(actor_id, failed=True)
            return
        self.samplers.finished(actor_id)
        self.counts["images"] += n
        self.lags[actor_id] = header["lag"]
        self.sampler_versions[actor_id] = header["policy_version"]
        self.metrics.set(M.ACTOR_VERSION_LAG, header["lag"], {"actor": actor_id})
        self.waiting_for_scorer.append((ref, n))

    def _on_score(self, ref: Any, actor_id: str, payload: tuple[list[Any], int]) -> None:
        record_refs, n = payload
        try:
            summary = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.counts["scorer_failures"] += 1
            log.warning("scorer %s failed a batch of %d (%s): counted as dropped", actor_id, n, type(exc).__name__)
            ray.get(self.buffer.record_drop.remote("scorer_failed", n))
            self.scorers.finished(actor_id, failed=True)
            return
        self.scorers.finished(actor_id)
        entries, drops = [], Counter()
        for meta, rec_ref in zip(summary["metas"], record_refs, strict=True):
            if meta["drop"]:
                drops[meta["drop_reason"] or "dropped"] += 1
            else:
                entries.append(BufferEntry(meta=SampleMeta(**meta), ref=rec_ref))
        for reason, k in drops.items():
            ray.get(self.buffer.record_drop.remote(reason, k))
        if entries:
            ray.get(self.buffer.add.remote(entries))
        self.counts["scored"] += n
        self.judge_counters[actor_id] = summary["judge"]
        if summary.get("preview"):
            p = summary["preview"]
            self.gallery.add(p["image"], p["meta"], p["R"])

    def _on_learn(self, ref: Any, actor_id: str, chunk: int) -> None:
        try:
            steps = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.counts["learner_failures"] += 1
            log.warning("learner failed (%s); Ray restarts it and it resumes from the latest checkpoint",
                        type(exc).__name__)
            if self.counts["learner_failures"] > max(self.cfg.cluster.max_restarts, 0) + 1:
                self.request_stop("learner failed repeatedly")
            return
        for stats in steps:
            self.step = stats["step"]
            self.policy_version = stats.get("policy_version", self.policy_version)
            self.last_train = stats
            self.reporter.log({"kind": "train", **stats})

    def _on_eval(self, ref: Any, actor_id: str, _payload: Any) -> None:
        try:
            self._on_eval_result(ray.get(ref))
        except ray.exceptions.RayError as exc:
            log.warning("held-out evaluation failed (%s)", type(exc).__name__)

    def _on_eval_result(self, result: dict[str, Any]) -> None:
        self.last_eval_step = result["step"]
        self.last_eval = result
        self.reporter.log({"kind": "eval", **result})
        cats = ", ".join(f"{k} {100 * v:.0f}%" for k, v in result.items()
                         if k not in ("overall", "n", "step", "policy_version", "eval_seconds"))
        print(f"\nsrum: held-out accuracy at step {result['step']}: {100 * result['overall']:.1f}% ({cats})",
              flush=True)

    # ------------------------------------------------------------------ reporting and shutdown
    def status(self) -> dict[str, Any]:
        elapsed = max(1e-6, time.monotonic() - self.t_start)
        buf = ray.get(self.buffer.stats.remote())
        judge_failed = sum(int(c.get("failed", 0)) for c in self.judge_counters.values())
        return {
            "run": self.cfg.run.name, "step": self.step, "max_steps": self.cfg.run.max_steps,
            "elapsed_s": elapsed, "images_per_s": self.counts["images"] / elapsed,
            "trained_per_s": buf["trained"] / elapsed,
            "mean_global_score": self.last_train.get("mean_global_score"), "loss": self.last_train.get("loss"),
            "l_r": self.last_train.get("l_r"), "l_ref": self.last_train.get("l_ref"),
            "buffer_size": buf["in_buffer"], "buffer": buf, "policy_version": self.policy_version,
            "lags": dict(self.lags), "sampler_versions": dict(self.sampler_versions), "max_lag": max(self.lags.values(), default=0),
            "judge": self.judge_counters, "judge_failed": judge_failed,
            "num_samplers": self.samplers.size(), "num_scorers": self.scorers.size(),
            "counts": dict(self.counts), "stop_reason": self.stop_reason,
            "heldout": self.last_eval,
        }

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - getattr(self, "_last_report", 0.0) < 1.0:
            return
        self._last_report = now
        status = self.status()
        self.metrics.set(M.BUFFER_SIZE, status["buffer_size"])
        self.controller.set_status.remote(status)
        self.reporter.show(status, force=force)

    def _drain(self, timeout_s: float = 60.0) -> None:
        """Let in-flight sample/score work finish so every generated sample is accounted for."""
        deadline = time.monotonic() + timeout_s
        while self.pending and time.monotonic() < deadline:
            self._submit_samples_to_scorers_only()
            ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=0.5)
            for ref in ready:
                kind, actor_id, payload = self.pending.pop(ref)
                getattr(self, f"_on_{kind}")(ref, actor_id, payload)
        lost = sum(p[1] if k == "score" else 0 for k, _, p in self.pending.values()) + sum(
            n for _, n in self.waiting_for_scorer)
        if lost:
            ray.get(self.buffer.record_drop.remote("shutdown", lost))

    def _submit_samples_to_scorers_only(self) -> None:
        cap, self.cfg.cluster.max_in_flight_batches = self.cfg.cluster.max_in_flight_batches, 0
        try:
            self._submit_samples()
        finally:
            self.cfg.cluster.max_in_flight_batches = cap

    def finish(self) -> dict[str, Any]:
        if not hasattr(self, "learner"):
            return {"stop_reason": self.stop_reason, "step": self.step}
        log.info("stopping (%s): draining in-flight work", self.stop_reason)
        self._drain()
        if self.cfg.run.eval_every and self.last_eval_step != self.step:
            self._on_eval_result(ray.get(self.learner.evaluate.remote()))
        final = ray.get(self.learner.stop.remote())
        self.step = final["step"]
        status = self.status()
        status["learner"] = final
        status["invariant_ok"] = bool(status["buffer"]["invariant_ok"])
        self._report(force=True)
        self.reporter.close()
        self.reporter.log({"kind": "final", **status})
        plot_metrics(self.reporter.metrics_path, self.run_dir / "curves.png")
        self.gallery.write()
        self.samplers.shutdown()
        self.scorers.shutdown()
        print(f"srum: stopped ({self.stop_reason}) at step {self.step}; outputs in {self.run_dir}", flush=True)
        return status
