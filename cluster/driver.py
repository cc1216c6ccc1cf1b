"""The online SRUM loop, driver side: creates the actors, keeps a bounded amount of work in flight,
routes sampled batches (by reference) to scorers and scored samples into the replay buffer, keeps the
learner busy, applies scale requests, reports progress, and stops cleanly (drain, final checkpoint,
plots, gallery).

One loop turn, top to bottom in :meth:`Driver._turn`: budget -> scale -> submit samples, scores and
learner work -> wait for one job to finish -> handle it by its type -> report. Stopping switches the
same loop into draining: nothing new is sampled or trained, what is in flight is scored, and the loop
ends when nothing is pending (or ``cluster.drain_timeout_s`` passed: what is left is counted
``shutdown``).

The driver holds only small values: sample headers, records and object references. Images and latents
go from a sampler to a scorer by reference; a sample's tensors go from the scorer's return (owned by
the driver) through the buffer to the learner, which fetches a whole draw with one ``ray.get``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import ray

from actors.components import Components
from actors.learner_host import LearnerHost, LearnResult
from actors.sampler import SamplerActor
from actors.scorer import ScorerActor, ScoreSummary
from actors.weights import WeightStore
from cluster.buffer import ReplayBuffer
from cluster.control import NAMESPACE, get_or_create_controller, release_controller
from cluster.health import OutageBreaker, logged_train_steps, storage_dir
from cluster.jobs import EndpointsJob, EvalJob, Job, LearnerProbeJob, LearnJob, PushJob, SampleJob, ScoreJob
from cluster.judges import JudgeReplicas
from cluster.pool import PROBE_EVERY_S, ActorPool
from cluster.progress import Gallery, ProgressReporter, format_eval, plot_metrics, unreadable_judge_warning
from cluster.push import WeightPusher, remote_class
from cluster.ray_cluster import call_while_restarting, check_resources, connect_ray
from cluster.rounds import Rounds
from core.config import SRUMConfig
from core.config_io import config_hash, config_to_yaml
from core.metrics import Metric, Metrics
from core.prompt_sets import PromptCycler
from core.records import DropReason, SampleHeader, TrainSample

log = logging.getLogger("srum.driver")

POLL_S = 0.5  # longest wait for a job before the loop turns again (scale requests, budget, report)
CONTROL_EVERY_S = 1.0  # how often the controller is asked for scale and stop requests


class Driver:
    def __init__(self, cfg: SRUMConfig, components: Components):
        # one storage location for every actor, resolved here before any of them starts
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"output_dir": str(storage_dir(cfg.run.output_dir))})})
        components = dataclasses.replace(components, cfg=cfg)
        self.cfg, self.components = cfg, components
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.earlier_steps = logged_train_steps(self.run_dir / "metrics.jsonl")
        (self.run_dir / "config.yaml").write_text(config_to_yaml(cfg), encoding="utf-8")
        self.reporter = ProgressReporter(self.run_dir)
        self.gallery = Gallery(self.run_dir)
        self.prompts = PromptCycler(components.train_prompts(), cfg.run.seed, cfg.cluster.prompts.shuffle)
        self.rounds = (Rounds(cfg.cluster.round_samples, cfg.cluster.round_epochs)
                       if cfg.cluster.mode == "rounds" else None)
        self.buffer = ReplayBuffer(cfg.cluster.buffer_capacity, cfg.cluster.max_staleness, cfg.cluster.recency_bias,
                                   cfg.run.seed, max_uses=self.rounds.epochs if self.rounds else 1)
        self.metrics = Metrics()
        self.pending: dict[Any, Job] = {}
        self.waiting_for_scorer: deque[tuple[SampleHeader, Any]] = deque()
        self.counts: Counter[str] = Counter()  # images generated and actor failures by role
        self.judge_counters: dict[str, dict[str, Any]] = {}  # per scorer, the judge's latest counters
        self.last_train: dict[str, Any] = {}
        self.step = self.start_step = self.policy_version = 0
        self.lags: dict[str, int] = {}
        self.sampler_versions: dict[str, int] = {}
        self.last_eval: dict[str, Any] | None = None  # the latest held-out evaluation
        self.last_eval_step: int | None = None
        self.last_refresh_step = 0
        self.round_shown: tuple[int, str] | None = None  # the round and phase the metrics show
        self.stop_reason: str | None = None  # why the loop stops (None while running)
        self.drain_deadline: float | None = None  # set when stopping: the loop drains until then
        self.t_start = time.monotonic()
        self.last_control = self.last_report = 0.0
        self.controller = self.store = self.learner = None  # the Ray actor handles, created by start()
        self.learner_down_since: float | None = None  # while Ray restarts the learner
        self.next_learner_probe = 0.0
        self.step_samples: dict[int, list[str]] = {}  # ids trained per recent step (to account a rollback)
        self.breaker = OutageBreaker(cfg.cluster.judge_outage_failure_rate, cfg.cluster.judge_outage_pause_s)
        c = cfg.cluster
        self.pusher = WeightPusher(c.weight_transport, cfg.run.name)
        launch = getattr(cfg.judge, "launch", None)
        self.judges = None if launch is None else JudgeReplicas(cfg.run.name, launch, cfg.judge.model,
                                                                self.run_dir / "judges", c.max_restarts)
        self.unreadable_warned = False  # the unreadable-judge warning is printed once
        # named (srum-<run>-<role>-<i>) so operators and tests can find a given actor
        self.samplers = ActorPool("sampler", lambda aid: remote_class(SamplerActor, c.weight_transport).options(
            name=f"srum-{cfg.run.name}-{aid}", num_cpus=c.sampler_resources.num_cpus,
            num_gpus=c.sampler_resources.num_gpus, max_restarts=c.max_restarts,
        ).remote(self.components, aid, self.store), max_in_flight_per_actor=c.sampler_calls_in_flight)
        self.scorers = ActorPool("scorer", lambda aid: ray.remote(ScorerActor).options(
            name=f"srum-{cfg.run.name}-{aid}", num_cpus=c.scorer_resources.num_cpus,
            num_gpus=c.scorer_resources.num_gpus, max_restarts=c.max_restarts, max_concurrency=c.scorer_concurrency,
        ).remote(self.components, aid), max_in_flight_per_actor=c.scorer_calls_in_flight)

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        cfg = self.cfg
        self.components.prepare()  # e.g. pretrain (or find) the world's cached base, once, before any actor builds it
        connect_ray(cfg)
        check_resources(cfg)
        self.controller = get_or_create_controller(NAMESPACE, samplers=cfg.cluster.num_samplers,
                                                   scorers=cfg.cluster.num_scorers)
        ray.get(self.controller.reset.remote(cfg.cluster.num_samplers, cfg.cluster.num_scorers, cfg.run.name,
                                             judges=None if self.judges is None else cfg.judge.launch.replicas))
        if self.judges is not None:
            self._use_judge_urls(self.judges.start())
        self.store = self.pusher.store = ray.remote(WeightStore).options(num_cpus=0).remote()
        res = cfg.cluster.learner_resources
        self.learner = remote_class(LearnerHost, cfg.cluster.weight_transport).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_restarts=cfg.cluster.max_restarts,
        ).remote(self.components, str(self.run_dir), self.store)
        self._resume(ray.get(self.learner.info.remote()))  # waits for the build (and a resume)
        if cfg.run.eval_every:
            self._on_eval(ray.get(self.learner.evaluate.remote()))  # the starting point
        self.samplers.scale_to(cfg.cluster.num_samplers)
        self.scorers.scale_to(cfg.cluster.num_scorers)
        ray.get([m.handle.start.remote() for m in self.scorers.active])  # judge health check: fail fast
        self.reporter.log({"kind": "start", "config_hash": config_hash(cfg), "run_dir": str(self.run_dir),
                           "resumed_at_step": self.step})
        print(f"srum: run '{cfg.run.name}' -> {self.run_dir} (ray: {ray.get_runtime_context().gcs_address})",
              flush=True)

    def _resume(self, info: dict[str, Any]) -> None:
        """Continue where the learner's checkpoint left off (step, version, data cursor, counters), or warn."""
        self.step = self.start_step = info["step"]
        self.policy_version = info["policy_version"]
        service = info.get("service") or {}
        if "prompts" in service:
            self.prompts.restore(service["prompts"])
        if self.rounds is not None:  # a round cut short starts again from its generation, with these weights
            self.rounds.restore(service.get("rounds", {"index": 0}), self.policy_version)
        self.counts.update(service.get("counts", {}))
        if "buffer" in service:
            self.buffer.restore(service["buffer"])
            # images that were being scored when that checkpoint was taken are gone with that driver
            self.buffer.record_drop(DropReason.SHUTDOWN, max(0, self.counts["images"] - self.buffer.stats()["generated"]))
        if info.get("resumed_from"):
            print(f"srum: resumed from {info['resumed_from']} at step {self.step}", flush=True)
        elif self.earlier_steps:
            msg = (f"srum: WARNING: {self.run_dir} holds an earlier run ({self.earlier_steps} learner steps in "
                   "metrics.jsonl) but no checkpoint: starting from step 0 (use another run.name for a fresh run)")
            print(msg, flush=True)
            log.warning(msg)

    def _use_judge_urls(self, urls: list[str]) -> None:
        """Actors created from now on judge against the launched replicas at ``urls``."""
        judge = self.components.cfg.judge.model_copy(update={"endpoints": list(urls), "launch": None})
        cfg = self.components.cfg.model_copy(update={"judge": judge})
        self.components = dataclasses.replace(self.components, cfg=cfg)

    def _follow_judges(self) -> None:
        """Launched judges: hand every scorer the healthy replicas' URLs when they change (and now and then)."""
        urls = None if self.judges is None else self.judges.urls_to_announce(self.scorers.epoch)
        if urls:
            self._use_judge_urls(urls)
            for member in self.scorers.active:
                self.pending[member.handle.set_judge_endpoints.remote(urls)] = EndpointsJob(member.actor_id)

    def _service_state(self) -> dict[str, Any]:
        """What a resumed driver needs, stored with the learner's checkpoints: the data cursor, the counters."""
        return {"prompts": self.prompts.state(), "counts": dict(self.counts), "buffer": self.buffer.counters(),
                **({"rounds": self.rounds.state()} if self.rounds is not None else {})}

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        try:
            self.start()
            self.t_start = time.monotonic()
            while not self._finished():
                self._turn()
        finally:
            summary = self.finish()
        return summary

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            self.drain_deadline = time.monotonic() + self.cfg.cluster.drain_timeout_s
            log.info("stopping (%s): draining in-flight work", reason)

    @property
    def draining(self) -> bool:
        return self.stop_reason is not None

    def _finished(self) -> bool:
        if not self.draining:
            return False
        return not (self.pending or self.waiting_for_scorer) or time.monotonic() > self.drain_deadline

    def _turn(self) -> None:
        self._check_budget()
        for pool in (self.samplers, self.scorers):
            for actor_id in pool.probe():
                self._on_dead(pool, actor_id)
        self._follow_judges()
        if not self.draining:
            self._apply_control()
            self._submit_samples()
            self._submit_learner()
        self._submit_scores()
        ready, _ = ray.wait(list(self.pending), num_returns=1, timeout=POLL_S)
        for ref in ready:
            self._handle(ref, self.pending.pop(ref))
        self._advance_round()
        self._report()

    def _advance_round(self) -> None:
        """Rounds mode: move to the next phase when this one is done (:mod:`cluster.rounds`)."""
        r = self.rounds
        if r is None or self.draining:
            return
        busy = {type(j) for j in self.pending.values()}
        if r.advance(kept=self.buffer.size(), generating=self._in_flight_batches() > 0, training=LearnJob in busy,
                     pushing=PushJob in busy, version=self.policy_version, step=self.step):
            self.reporter.log({"kind": "round", **r.status()})
            if r.phase == "train":
                print(f"\nsrum: round {r.index}: {r.pool} of {r.submitted} samples kept (version {r.version}); "
                      f"training {r.epochs} epoch(s)", flush=True)
        if (r.index, r.phase) != self.round_shown:
            self.round_shown = (r.index, r.phase)
            self.metrics.set(Metric.ROUND, r.index)
            for name in ("generate", "train", "sync"):
                self.metrics.set(Metric.ROUND_PHASE, int(name == r.phase), phase=name)

    def _check_budget(self) -> None:
        if self.step >= self.cfg.run.max_steps:
            self.request_stop("max_steps")
        elif self.cfg.run.max_seconds and time.monotonic() - self.t_start > self.cfg.run.max_seconds:
            self.request_stop("max_seconds")

    def _apply_control(self) -> None:
        now = time.monotonic()
        if now - self.last_control < CONTROL_EVERY_S:
            return
        self.last_control = now
        want = ray.get(self.controller.get_desired.remote())
        if want.get("stop"):
            self.request_stop("stop requested")
        for pool, n in ((self.samplers, want["samplers"]), (self.scorers, want["scorers"])):
            if n != pool.size():
                added, draining = pool.scale_to(n)
                self.reporter.log({"kind": "scale", "role": pool.role, "to": n, "added": added, "draining": draining})
            self.metrics.set(Metric.ACTORS, n, role=pool.role, state="desired")
            self.metrics.set(Metric.ACTORS, pool.size(), role=pool.role, state="alive")
        if self.judges is not None and want.get("judges", self.judges.size()) != self.judges.size():
            self.judges.scale_to(want["judges"])
            self.reporter.log({"kind": "scale", "role": "judge", "to": want["judges"]})
        if self.judges is not None:
            self.metrics.set(Metric.ACTORS, self.judges.size(), role="judge", state="desired")
            self.metrics.set(Metric.ACTORS, len(self.judges.urls()), role="judge", state="alive")
        for actor_id in self.samplers.reap():
            self.lags.pop(actor_id, None)
            self.sampler_versions.pop(actor_id, None)
        self.scorers.reap()

    # ------------------------------------------------------------------ submissions
    def _in_flight_batches(self) -> int:
        return sum(isinstance(j, SampleJob | ScoreJob) for j in self.pending.values()) + len(self.waiting_for_scorer)

    def _generation_budget(self) -> int:
        """Samples that may be asked for now: what the round still needs, or (online) what keeps the buffer and
        the batches in flight within ``ahead_batches`` and ``max_staleness - 1`` batches (further: stale)."""
        if self.rounds is not None:
            return self.rounds.samples_left()
        c = self.cfg.cluster
        ahead = min(c.ahead_batches, max(1, c.max_staleness - 1)) * self.cfg.learner.batch_size  # consumed soon
        return ahead - self.buffer.size() - self._in_flight_batches() * c.sample_batch_size

    def _submit_samples(self) -> None:
        cap = self.breaker.allowed_in_flight(self.cfg.cluster.max_in_flight_batches)  # 0 during a judge outage
        min_version = None if self.rounds is None else self.rounds.version  # rounds: the round's frozen weights
        while self._in_flight_batches() < cap and (budget := self._generation_budget()) > 0:
            member = self.samplers.pick()
            if member is None:
                return
            n = self.cfg.cluster.sample_batch_size if self.rounds is None else min(budget, self.cfg.cluster.sample_batch_size)
            prompts, seeds = self.prompts.take(n)
            self.samplers.started(member)
            header_ref, batch_ref = member.handle.sample.options(num_returns=2).remote(prompts, seeds, min_version)
            self.pending[header_ref] = SampleJob(member.actor_id, batch_ref)
            if self.rounds is not None:
                self.rounds.submitted_batch(n)

    def _submit_scores(self) -> None:
        while self.waiting_for_scorer:
            member = self.scorers.pick()
            if member is None:
                return
            header, batch_ref = self.waiting_for_scorer.popleft()
            self.scorers.started(member)
            summary_ref, *tensor_refs = member.handle.score.options(num_returns=1 + header.n).remote(header, batch_ref)
            self.pending[summary_ref] = ScoreJob(member.actor_id, header, tensor_refs)

    def _submit_learner(self) -> None:
        if any(isinstance(j, LearnJob | EvalJob | LearnerProbeJob) for j in self.pending.values()):
            return
        if self.learner_down_since is not None:  # Ray is restarting it: ask whether it is back, now and then
            if time.monotonic() >= self.next_learner_probe:
                self.pending[self.learner.info.remote()] = LearnerProbeJob()
            return
        every = self.cfg.run.eval_every
        if every and self.step // every > (self.last_eval_step or 0) // every:
            self.last_eval_step = self.step
            self.pending[self.learner.evaluate.remote()] = EvalJob()
            return
        bs, rounds = self.cfg.learner.batch_size, self.rounds
        if rounds is not None and rounds.phase != "train":
            return
        # rounds: the pool is trained to its end (a short last batch too) and staleness counts from the round's
        # version; online: full batches only, staleness from the learner's version
        ready = -(-self.buffer.uses_left() // bs) if rounds else self.buffer.size() // bs
        n_steps = min(self.cfg.run.max_steps - self.step, self.cfg.learner.sync_every, ready)
        if n_steps <= 0:
            return
        version, min_n = (rounds.version, 1) if rounds else (self.policy_version, bs)
        batches = [self.buffer.sample(bs, version, min_n=min_n) for _ in range(n_steps)]
        batches = [b for b in batches if b]  # stale eviction may leave fewer full batches than counted
        publish = None if rounds is None else self.buffer.size() == 0  # rounds: once, at the end of the pool
        if batches:
            ids = tuple(dict.fromkeys(s.sample_id for b in batches for s in b))
            self.pending[self.learner.train.remote(batches, self._service_state(), publish, self.pusher.take_leases())] = LearnJob(ids)

    # ------------------------------------------------------------------ completions
    def _handle(self, ref: Any, job: Job) -> None:
        match job:
            case SampleJob(actor_id=actor_id, batch=batch_ref):
                self._on_sample(ref, actor_id, batch_ref)
            case ScoreJob():
                self._on_score(ref, job)
            case LearnJob():
                self._on_learn(ref, job)
            case EvalJob():
                try:
                    self._on_eval(ray.get(ref))
                except ray.exceptions.RayActorError as exc:
                    self._learner_lost(exc)
                except ray.exceptions.RayError as exc:
                    log.warning("held-out evaluation failed (%s)", type(exc).__name__)
            case LearnerProbeJob():
                self._on_learner_probe(ref)
            case PushJob():
                self._on_push(ref, job)
            case EndpointsJob(actor_id=actor_id):
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as exc:  # a dead or restarting scorer: its pool finds out
                    log.info("scorer %s did not take the judge URLs (%s)", actor_id, type(exc).__name__)

    def _on_sample(self, ref: Any, actor_id: str, batch_ref: Any) -> None:
        try:
            header: SampleHeader = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.counts["sampler_failures"] += 1
            log.warning("sampler %s failed a batch (%s)", actor_id, type(exc).__name__)
            if self.samplers.finished(actor_id, error=exc):
                self._on_dead(self.samplers, actor_id)
            return
        self.samplers.finished(actor_id)
        self.counts["images"] += header.n
        self.lags[actor_id] = header.lag
        self.sampler_versions[actor_id] = header.policy_version
        self.metrics.set(Metric.VERSION_LAG, header.lag, actor=actor_id)
        self.waiting_for_scorer.append((header, batch_ref))

    def _on_score(self, ref: Any, job: ScoreJob) -> None:
        try:
            summary: ScoreSummary = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.counts["scorer_failures"] += 1
            log.warning("scorer %s failed a batch of %d (%s): counted as dropped", job.actor_id, job.header.n,
                        type(exc).__name__)
            self.buffer.record_drop(DropReason.SCORER_FAILED, job.header.n)
            if self.scorers.finished(job.actor_id, error=exc):
                self._on_dead(self.scorers, job.actor_id)
            return
        self.scorers.finished(job.actor_id)
        records = summary.records
        if self.rounds is not None:  # a round's pool is one version's: a sampler that missed it made stale ones
            records = [r.model_copy(update={"drop_reason": DropReason.STALE})
                       if not r.dropped and r.policy_version != self.rounds.version else r for r in records]
        self.buffer.add([TrainSample(rec, None if rec.dropped else tref)
                         for rec, tref in zip(records, job.tensors, strict=True)])
        self.breaker.observe(rec.drop_reason == DropReason.JUDGE_FAILED for rec in summary.records)
        self.judge_counters[job.actor_id] = summary.judge
        if summary.preview is not None:
            p = summary.preview
            self.gallery.add(p.image, p.record, p.R, p.stride)

    def _on_learn(self, ref: Any, job: LearnJob) -> None:
        try:
            result: LearnResult = ray.get(ref)
        except ray.exceptions.RayError as exc:
            self.buffer.mark_lost(job.sample_ids)  # drawn, never trained: accounted, not silently "trained"
            if isinstance(exc, ray.exceptions.RayActorError):
                self._learner_lost(exc)
                return
            self.counts["learner_failures"] += 1  # an error inside train() (the actor lives)
            log.warning("learner step failed: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            limit = self.cfg.cluster.max_restarts
            if limit >= 0 and self.counts["learner_failures"] > limit + 1:
                self.request_stop("learner failed repeatedly")
            return
        if result.lost:
            self.buffer.mark_lost(result.lost)
        for stats, ids in zip(result.steps, result.step_ids, strict=True):
            self.step = int(stats["step"])
            self.policy_version = int(stats["policy_version"])
            self.step_samples[self.step] = ids
            self.last_train = stats
            self.reporter.log({"kind": "train", **stats})
        lc = self.cfg.learner  # a restart resumes at a kept checkpoint at the earliest: older steps are never undone
        if lc.checkpoint_every and lc.keep_checkpoints:
            self.step_samples = {s: v for s, v in self.step_samples.items()
                                 if s > self.step - lc.checkpoint_every * (lc.keep_checkpoints + 1)}
        if self.step - self.last_refresh_step >= self.cfg.run.refresh_every:
            self._refresh_outputs()
        self._push_weights(result)

    def _push_weights(self, result: LearnResult) -> None:
        """Send the learner's new version to every live sampler (:mod:`cluster.push`); count what shm could not."""
        self.counts["weight_shm_fallbacks"] += result.shm_fallbacks  # 0 unless weight_transport is shm
        if self.learner_down_since is not None:
            return
        live, now = {m.actor_id: m.handle for m in self.samplers.active if not m.restarting}, time.monotonic()
        for ref, actor_id in self.pusher.push(self.learner, live, self.policy_version, self.samplers.epoch,
                                              result.published, result.shm).items():
            self.pending[ref] = PushJob(actor_id, now)

    def _on_push(self, ref: Any, job: PushJob) -> None:
        try:
            version = ray.get(ref)
        except ray.exceptions.RayError as exc:  # the sampler keeps its weights; the object store is the fallback
            self.counts["weight_push_failures"] += 1
            self.metrics.inc(Metric.WEIGHT_SYNC_FAILURES, 1, actor=job.actor_id)
            self.pusher.invalidate()
            log.warning("weight push to %s failed (%s): it falls back to the object store", job.actor_id,
                        type(exc).__name__)
            return
        self.counts["weight_pushes"] += 1
        self.sampler_versions[job.actor_id] = version
        self.metrics.observe(Metric.WEIGHT_SYNC_TIME, time.monotonic() - job.sent_at, actor=job.actor_id)

    # ------------------------------------------------------------------ failures
    def _learner_lost(self, exc: BaseException) -> None:
        """The learner's process is gone: Ray restarts it (a state, not a failure) or it is dead for good."""
        if isinstance(exc, ray.exceptions.ActorDiedError):
            self.request_stop("learner died and Ray will not restart it (cluster.max_restarts exhausted)")
            return
        if self.learner_down_since is None:
            self.learner_down_since = time.monotonic()
            log.warning("the learner is restarting; it resumes from its latest checkpoint (waiting up to %.0f s)",
                        self.cfg.cluster.learner_restart_timeout_s)

    def _on_learner_probe(self, ref: Any) -> None:
        try:
            info = ray.get(ref)
        except ray.exceptions.ActorUnavailableError:  # still restarting
            waited = time.monotonic() - self.learner_down_since
            if waited > self.cfg.cluster.learner_restart_timeout_s:
                self.request_stop(f"learner did not come back within cluster.learner_restart_timeout_s "
                                  f"({waited:.0f} s)")
            self.next_learner_probe = time.monotonic() + PROBE_EVERY_S
            return
        except ray.exceptions.RayActorError as exc:
            self.learner_down_since = None
            self._learner_lost(exc)
            return
        self._rolled_back(info)

    def _rolled_back(self, info: dict[str, Any]) -> None:
        """The learner resumed at ``info["step"]``: later steps are undone once, their samples ``rolled_back``."""
        to, was = info["step"], self.step
        undone = [s for s in self.step_samples if s > to]
        samples = self.buffer.mark_lost([i for s in undone for i in self.step_samples.pop(s)], DropReason.ROLLED_BACK)
        self.step, self.policy_version = to, info["policy_version"]
        self.counts["learner_restarts"] += 1
        self.pusher.invalidate()  # the learner is a new process: a new group (RDT)
        down = time.monotonic() - self.learner_down_since
        self.learner_down_since = None
        self.reporter.log({"kind": "rollback", "from_step": was, "to_step": to, "samples": samples,
                           "down_s": down, "resumed_from": info.get("resumed_from")})
        print(f"\nsrum: the learner is back after {down:.0f} s at step {to} (it was at step {was}; {samples} "
              "trained samples rolled back)", flush=True)

    def _on_dead(self, pool: ActorPool, actor_id: str) -> None:
        """An actor Ray will not restart: counted once; the controller's count follows; no actor left stops."""
        self.counts[f"{pool.role}_dead"] += 1
        self.lags.pop(actor_id, None)
        self.sampler_versions.pop(actor_id, None)
        self.reporter.log({"kind": "actor_dead", "role": pool.role, "actor": actor_id})
        if pool.size() == 0:
            self.request_stop(f"no live {pool.role} left (the last one died and Ray will not restart it)")
            return
        try:
            ray.get(self.controller.scale.remote(**{f"{pool.role}s": pool.size()}))
        except ray.exceptions.RayTaskError as exc:  # e.g. the job is stopping: nothing to follow
            log.info("controller did not take the new %s count: %s", pool.role, exc)

    def _on_eval(self, result: dict[str, Any]) -> None:
        self.last_eval_step, self.last_eval = result["step"], result
        self.reporter.log({"kind": "eval", **result})
        print(f"\n{format_eval(result)}", flush=True)

    # ------------------------------------------------------------------ reporting and shutdown
    def status(self) -> dict[str, Any]:
        elapsed = max(1e-6, time.monotonic() - self.t_start)
        buf = self.buffer.stats()
        return {
            "run": self.cfg.run.name, "step": self.step, "max_steps": self.cfg.run.max_steps,
            "elapsed_s": elapsed, "images": self.counts["images"], "images_per_s": self.counts["images"] / elapsed,
            "trained": buf["trained"], "trained_per_s": buf["trained"] / elapsed,
            "mean_global_score": self.last_train.get("mean_global_score"), "loss": self.last_train.get("loss"),
            "l_r": self.last_train.get("l_r"), "l_ref": self.last_train.get("l_ref"),
            "buffer_size": buf["in_buffer"], "buffer": buf, "policy_version": self.policy_version,
            "lags": dict(self.lags), "sampler_versions": dict(self.sampler_versions),
            "max_lag": max(self.lags.values(), default=0),
            "judge": self.judge_counters, "judge_failed": buf["dropped"].get(DropReason.JUDGE_FAILED.value, 0),
            "judge_unread": buf["dropped"].get(DropReason.NO_GLOBAL_SCORE.value, 0),
            "judge_outage": {"pauses": self.breaker.pauses, "paused_s": self.breaker.paused_seconds,
                             "paused": self.breaker.paused()},
            "learner_restarting": self.learner_down_since is not None,
            "num_samplers": self.samplers.size(), "num_scorers": self.scorers.size(),
            "counts": dict(self.counts), "stop_reason": self.stop_reason, "heldout": self.last_eval,
            "mode": self.cfg.cluster.mode, **({"round": self.rounds.status()} if self.rounds is not None else {}),
            **({"judges": self.judges.status()} if self.judges is not None else {}),
        }

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_report < 1.0:
            return
        self.last_report = now
        status = self.status()
        self.controller.set_status.remote(status)
        self.reporter.show(status, force=force)
        self._warn_unreadable_judge(status["buffer"])

    def _warn_unreadable_judge(self, buf: dict[str, Any]) -> None:
        """Once: nearly every answer so far had no readable global score (the loop has nothing to train on)."""
        msg = None if self.unreadable_warned else unreadable_judge_warning(buf, self.cfg.judge.mode)
        if msg is not None:
            self.unreadable_warned = True
            print(msg, flush=True)
            log.warning(msg)

    def _refresh_outputs(self) -> None:
        self.last_refresh_step = self.step
        plot_metrics(self.reporter.metrics_path, self.run_dir / "curves.png")
        self.gallery.write()

    def finish(self) -> dict[str, Any]:
        if self.learner is None:  # failed while starting: nothing to drain
            self._shutdown_actors()
            return {"stop_reason": self.stop_reason, "step": self.step}
        lost = sum(j.header.n for j in self.pending.values() if isinstance(j, ScoreJob))
        lost += sum(h.n for h, _ in self.waiting_for_scorer)
        if lost:  # generated, but the drain time ran out before they were scored
            self.buffer.record_drop(DropReason.SHUTDOWN, lost)
        self.buffer.release()
        try:
            if self.cfg.run.eval_every and self.last_eval_step != self.step:
                self._on_eval(call_while_restarting(self.learner, "evaluate", self.cfg.cluster.learner_restart_timeout_s))
            final = call_while_restarting(self.learner, "stop", self.cfg.cluster.learner_restart_timeout_s)  # final checkpoint
            self.step = final["step"]
        except ray.exceptions.RayError as exc:  # the outputs below are written anyway
            log.error("the learner could not write its final checkpoint: %s", exc)
            final = {"step": self.step, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        status = self.status()
        status["learner"] = final
        status["invariant_ok"] = bool(status["buffer"]["invariant_ok"])
        self._report(force=True)
        self.reporter.close()
        self.reporter.log({"kind": "final", **status})
        self._refresh_outputs()
        self.pusher.close()
        self._shutdown_actors()
        print(f"srum: stopped ({self.stop_reason}) at step {self.step}; outputs in {self.run_dir}", flush=True)
        return status

    def _shutdown_actors(self) -> None:
        self.samplers.shutdown()
        self.scorers.shutdown()
        if self.judges is not None:
            self.judges.shutdown()
        release_controller(self.controller)
