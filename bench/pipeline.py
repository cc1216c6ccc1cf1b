"""Benchmark: the online Ray loop vs the same work done sequentially, pipeline efficiency, weight sync.

Side by side in one run, tiny models on CPU (issue 5, "Benchmarks"):

1. **Online vs sequential** samples trained per second. *Online*: the real :class:`cluster.driver.Driver`
   (sampler, scorer and learner actors, replay buffer, weight store) on a local Ray bound to 127.0.0.1.
   *Sequential*: one process, one policy, a plain loop ``Policy.sample -> SampleScorer.score_many ->
   Learner.train_step`` with the same library classes, config, batch sizes and prompts, at the
   faster torch thread count (default or 1, probed before each run: two OpenMP threads collapse when
   another process holds one of the two cores; the actors run one thread each). Two
   scenarios: ``lat200`` (``judge.backend=openai`` against the tests' fake OpenAI server in a child
   process that sleeps 200 ms per request) and ``nolat`` (the in-process tiny transformers judge).
   Targets: >= 3x and >= 1.0x.
2. **Pipeline efficiency**: online trained/s divided by the slowest stage's rate measured alone with
   the same actors, options and in-flight bounds as the driver uses (samplers alone, scorers alone
   fed pre-generated batches, learner host alone fed a pre-filled replay buffer). Target >= 0.85.
3. **Weight sync**: ``publish_state`` + ``maybe_sync`` into 2 sampler actors (wall time until both
   loaded the new version) divided by one in-process ``load_trainable_state`` of the same tensors into
   a second policy; full fine-tuning and LoRA (``policy.lora_rank=8``). Target <= 3.

Steady state only: online and sequential rates are measured between the ``--warmup``-th learner step
and the last one (driver ``metrics.jsonl`` timestamps for the online loop), so actor start-up, model
builds and the final drain/checkpoint are excluded. Online and sequential runs alternate order over
``--reps`` repetitions; medians are reported.

Shared machine: every measured window also records the CPU used by processes outside the benchmark
(:class:`_pipeline_util.CpuMonitor`, printed per run with a per-actor breakdown). A window in which they
used more than ``--contention-limit`` cores is measured again (``--tries``); a figure that is still
contended is printed with ``ok=false`` and a WARNING, never as a pass.

Defaults: ``configs/tiny_sd3.yaml`` with ``regions.proposer=none``, judge mode text, 2 samplers,
1 scorer, ``cluster.max_in_flight_batches=4``, batch 4, checkpoints off; about 4.5 minutes on two idle
cores. ``--set KEY=VALUE`` adds any config override to every run (e.g. ``cluster.max_staleness=8``).
Run outputs (driver log, metrics.jsonl) go to a temporary directory, removed at the end unless
``--keep-outputs`` (or the run failed).

Usage: ``python bench/pipeline.py [--reps 2] [--proposer none] [--samplers 2] [--scorers 1] [--set K=V]``.
Ends with ``RESULT <name> <value> target=<t> ok=<true|false>`` lines.
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the local Ray on 127.0.0.1 (read at import)
os.environ.pop("RAY_ADDRESS", None)  # always our own local cluster, never someone else's
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from _pipeline_util import (  # noqa: E402
    CpuMonitor,
    JudgeServerProcess,
    format_usage,
    generation_window,
    median,
    read_train_points,
    steady_rate,
)
from PIL import Image  # noqa: E402

from actors.learner_host import LearnerHost  # noqa: E402
from actors.sampler import SamplerActor  # noqa: E402
from actors.scorer import ScorerActor  # noqa: E402
from cluster.buffer import ReplayBuffer  # noqa: E402
from cluster.config import SRUMConfig, load_config  # noqa: E402
from cluster.driver import NAMESPACE, Driver, PromptCycler  # noqa: E402
from cluster.prompt_sets import load_prompt_source  # noqa: E402
from cluster.records import BufferEntry, SampleMeta, new_sample_id  # noqa: E402
from cluster.weights import WeightStore, maybe_sync, publish_state, state_nbytes  # noqa: E402
from learner.learner import Learner  # noqa: E402
from learner.policy import Policy  # noqa: E402
from rewards.judge import make_judge  # noqa: E402
from rewards.regions import make_proposer  # noqa: E402
from rewards.scorer import SampleScorer  # noqa: E402

CONFIG = ROOT / "configs" / "tiny_sd3.yaml"  # tiny SD3 policy, tiny transformers judge, tiny SAM
TARGETS = {
    "pipeline_speedup_latency200ms": (">=", 3.0),
    "pipeline_speedup_nolatency": (">=", 1.0),
    "pipeline_efficiency": (">=", 0.85),
    "weight_sync_ratio_full": ("<=", 3.0),
    "weight_sync_ratio_lora": ("<=", 3.0),
}
SAMPLER_IN_FLIGHT = 2  # per actor, as cluster/driver.py's ActorPool for samplers
SCORER_IN_FLIGHT = 4  # per actor, as cluster/driver.py's ActorPool for scorers
SCORER_CONCURRENCY = 8  # max_concurrency of scorer actors in cluster/driver.py


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ config
def scenario_config(args: argparse.Namespace, scenario: str, out_dir: Path, judge_url: str | None,
                    extra: Sequence[str] = ()) -> SRUMConfig:
    """``args.config`` (default configs/tiny_sd3.yaml) plus the benchmark's overrides; ``scenario`` is "lat200" or "nolat"."""
    over = [
        f"run.output_dir={out_dir}", "learner.checkpoint_every=0",
        f"regions.proposer={args.proposer}",
        f"cluster.num_samplers={args.samplers}", f"cluster.num_scorers={args.scorers}",
        f"cluster.max_in_flight_batches={args.in_flight}",
        f"cluster.sample_batch_size={args.batch}", f"learner.batch_size={args.batch}",
    ]
    if scenario == "lat200":
        over += ["judge.backend=openai", f"judge.mode={args.judge_mode}", f"judge.endpoints=[{judge_url}]"]
    return load_config(args.config, [*over, *args.set, *extra])


def describe(cfg: SRUMConfig) -> str:
    c, j = cfg.cluster, cfg.judge
    judge = (f"openai/{j.mode} (fake server, {j.endpoints[0]})" if j.backend == "openai"
             else f"{j.backend}/{j.mode} (in-process tiny VLM)")
    return (f"policy {cfg.policy.kind} tiny {cfg.policy.height}x{cfg.policy.width} {cfg.policy.num_inference_steps} steps "
            f"lora_rank={cfg.policy.lora_rank}; judge {judge}; regions {cfg.regions.proposer}; "
            f"batch {c.sample_batch_size}/{cfg.learner.batch_size}; samplers {c.num_samplers} "
            f"({c.sampler_resources.num_cpus} cpu) scorers {c.num_scorers} ({c.scorer_resources.num_cpus} cpu) "
            f"learner ({c.learner_resources.num_cpus} cpu); max_in_flight_batches {c.max_in_flight_batches}; "
            f"sync_every {cfg.learner.sync_every}; max_staleness {c.max_staleness}")


def kill(*handles: Any) -> None:
    for h in handles:
        with contextlib.suppress(Exception):
            ray.kill(h, no_restart=True)


# ------------------------------------------------------------------------------------ sequential
def run_sequential(cfg: SRUMConfig, warmup: int, steps: int, threads: int) -> dict[str, Any]:
    """The same work in one process: sample a batch, score it, train on full batches; one policy
    (so no weight copies), ``threads`` torch intra-op threads. Returns the steady-state rate and
    per-stage seconds per batch."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_sequential(cfg, warmup, steps)
    finally:
        torch.set_num_threads(prev_threads)


def choose_threads(cfg: SRUMConfig, reps: int = 3) -> tuple[int, dict[int, float]]:
    """The faster torch thread count for the sequential baseline, from ``reps`` timed ``Policy.sample``
    batches at the default count and at 1 (after one warm-up each). Two OpenMP threads on two cores
    are faster on an idle machine and many times slower when another process holds a core."""
    policy = Policy.from_config(cfg.policy, seed=cfg.run.seed)
    prompts = [f"probe prompt {i}" for i in range(cfg.cluster.sample_batch_size)]
    prev, timings = torch.get_num_threads(), {}
    try:
        for threads in sorted({prev, 1}, reverse=True):
            torch.set_num_threads(threads)
            policy.sample(prompts, list(range(len(prompts))))
            ts = []
            for r in range(reps):
                t0 = time.perf_counter()
                policy.sample(prompts, [1000 * (r + 1) + i for i in range(len(prompts))])
                ts.append(time.perf_counter() - t0)
            timings[threads] = median(ts)
    finally:
        torch.set_num_threads(prev)
    return min(timings, key=timings.get), timings


def _run_sequential(cfg: SRUMConfig, warmup: int, steps: int, max_seconds: float = 60.0) -> dict[str, Any]:
    policy = Policy.from_config(cfg.policy, seed=cfg.run.seed)
    learner = Learner(cfg, policy)
    judge = make_judge(cfg.judge)
    scorer = SampleScorer(judge, make_proposer(cfg.regions, judge=judge), cfg.reward)
    prompts = PromptCycler(load_prompt_source(cfg.cluster.prompts, cfg.run.seed), cfg.run.seed,
                           cfg.cluster.prompts.shuffle)
    n, bs = cfg.cluster.sample_batch_size, cfg.learner.batch_size
    points: list[tuple[float, float]] = []
    stage = {"sample": [], "score": [], "train": []}

    async def loop() -> None:
        check = getattr(judge, "check_health", None)
        if check is not None:
            await check()
        pending: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
        trained = 0
        deadline = time.monotonic() + max_seconds  # a bound for a badly contended machine
        while len(points) < warmup + steps + 1 and not (time.monotonic() > deadline and len(points) >= warmup + 2):
            recs, seeds = prompts.take(n)
            texts = [r.text for r in recs]
            t0 = time.perf_counter()
            batch = policy.sample(texts, seeds)
            t1 = time.perf_counter()
            images = [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in batch.images.numpy()]
            scored = await scorer.score_many(images, texts, tuple(batch.x0.shape[-2:]))
            t2 = time.perf_counter()
            pending += [(texts[i], batch.x0[i], s.R_latent, float(s.alpha))
                        for i, s in enumerate(scored) if not (s.drop or s.failed)]
            while len(pending) >= bs:
                take, pending = pending[:bs], pending[bs:]
                learner.train_step({"prompts": [p[0] for p in take], "x0": torch.stack([p[1] for p in take]),
                                    "R": torch.stack([p[2] for p in take]),
                                    "alpha": torch.tensor([p[3] for p in take], dtype=torch.float32)})
                trained += bs
                points.append((time.time(), float(trained)))
            t3 = time.perf_counter()
            for k, dt in (("sample", t1 - t0), ("score", t2 - t1), ("train", t3 - t2)):
                stage[k].append(dt)
        close = getattr(judge, "aclose", None)
        if close is not None:
            await close()

    with CpuMonitor() as cpu:
        asyncio.run(loop())
    rate, counted, seconds = steady_rate(points, warmup)
    skip = warmup + 1
    return {"rate": rate, "counted": counted, "seconds": seconds,
            "stage_s": {k: median(v[skip:] or v) for k, v in stage.items()},
            "cpu": cpu.usage(points[warmup][0], points[-1][0])}


# ---------------------------------------------------------------------------------------- online
def run_online(cfg: SRUMConfig, warmup: int, steps: int, log_path: Path) -> dict[str, Any]:
    """The real Driver for ``warmup + steps + 1`` learner steps; the rate comes from metrics.jsonl."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.max_steps = warmup + steps + 1
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out), CpuMonitor() as cpu:
        driver = Driver(cfg)
        try:
            status = driver.run()
        finally:
            kill(*(getattr(driver, a) for a in ("learner", "buffer", "store") if hasattr(driver, a)))
    points = read_train_points(driver.run_dir / "metrics.jsonl")
    rate, counted, seconds = steady_rate(points, warmup)
    buf = status["buffer"]
    return {"rate": rate, "counted": counted, "seconds": seconds, "wall_s": time.monotonic() - t0,
            "dropped": dict(buf.get("dropped", {})), "generated": buf.get("generated"),
            "trained": buf.get("trained"), "max_lag": status.get("max_lag"), "invariant_ok": status["invariant_ok"],
            "cpu": cpu.usage(points[warmup][0], points[-1][0])}


# ---------------------------------------------------------------------------------- stages alone
def _drive(submit: Any, total: int, cap: int, on_done: Any) -> list[float]:
    """Keep ``cap`` calls in flight (``submit() -> ref``) until ``total`` have finished; returns the
    finish times. Calls still in flight at the end are left to the caller (kill the actors)."""
    in_flight: set[Any] = set()
    finished: list[float] = []
    while len(finished) < total:
        while len(in_flight) < cap:
            in_flight.add(submit())
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in ready:
            in_flight.discard(ref)
            on_done(ref)
            finished.append(time.perf_counter())
    return finished


def stage_samplers(cfg: SRUMConfig, warmup: int, batches: int) -> tuple[dict[str, Any], list[Any]]:
    """Sampler actors alone, as the driver creates and feeds them. Returns the rate and some batch refs."""
    c, res = cfg.cluster, cfg.cluster.sampler_resources
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    actors = [ray.remote(SamplerActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
        cfg, f"sampler-{i}", store) for i in range(c.num_samplers)]
    ray.get([a.ping.remote() for a in actors])
    prompts = PromptCycler(load_prompt_source(c.prompts, cfg.run.seed), cfg.run.seed, c.prompts.shuffle)
    load = [0] * len(actors)
    owner: dict[Any, int] = {}
    kept: list[Any] = []

    def submit() -> Any:
        i = min(range(len(actors)), key=lambda k: load[k])
        recs, seeds = prompts.take(c.sample_batch_size)
        ref = actors[i].sample.remote(recs, seeds)
        owner[ref] = i
        load[i] += 1
        return ref

    def done(ref: Any) -> None:
        load[owner.pop(ref)] -= 1
        ray.get(ref)
        if len(kept) < 8:
            kept.append(ref)

    cap = min(SAMPLER_IN_FLIGHT * len(actors), c.max_in_flight_batches)
    times = _drive(submit, warmup + cap * max(1, math.ceil(batches / cap)) + 1, cap, done)
    kill(*actors, store)
    n = c.sample_batch_size
    points = generation_window([(t, (k + 1) * n) for k, t in enumerate(times)], warmup, cap)
    rate, counted, seconds = steady_rate(points, warmup)
    return {"rate": rate, "counted": counted, "seconds": seconds, "in_flight": cap}, kept


def stage_scorers(cfg: SRUMConfig, inputs: list[Any], warmup: int, batches: int) -> tuple[dict[str, Any], list]:
    """Scorer actors alone, fed pre-generated sampler outputs. Returns the rate and (meta, record ref) pairs."""
    c, res = cfg.cluster, cfg.cluster.scorer_resources
    actors = [ray.remote(ScorerActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                              max_concurrency=SCORER_CONCURRENCY).remote(cfg, f"scorer-{i}")
              for i in range(c.num_scorers)]
    ray.get([a.start.remote() for a in actors])
    n = c.sample_batch_size
    load = [0] * len(actors)
    owner: dict[Any, tuple[int, list[Any]]] = {}
    records: list[tuple[dict[str, Any], Any]] = []
    counter = [0]

    def submit() -> Any:
        i = min(range(len(actors)), key=lambda k: load[k])
        refs = actors[i].score_batch.options(num_returns=1 + n).remote(inputs[counter[0] % len(inputs)])
        counter[0] += 1
        owner[refs[0]] = (i, refs[1:])
        load[i] += 1
        return refs[0]

    def done(ref: Any) -> None:
        i, rec_refs = owner.pop(ref)
        load[i] -= 1
        summary = ray.get(ref)
        if len(records) < 32:
            records.extend((m, r) for m, r in zip(summary["metas"], rec_refs, strict=True) if not m["drop"])

    cap = min(SCORER_IN_FLIGHT * len(actors), c.max_in_flight_batches)
    times = _drive(submit, warmup + cap * max(1, math.ceil(batches / cap)) + 1, cap, done)
    kill(*actors)
    points = generation_window([(t, (k + 1) * n) for k, t in enumerate(times)], warmup, cap)
    rate, counted, seconds = steady_rate(points, warmup)
    return {"rate": rate, "counted": counted, "seconds": seconds, "in_flight": cap}, records


def stage_learner(cfg: SRUMConfig, records: list[tuple[dict[str, Any], Any]], warmup: int, steps: int,
                  run_dir: Path) -> dict[str, Any]:
    """The learner host alone, one ``run(1)`` call per step as the driver makes them, drawing from a replay
    buffer refilled (untimed) with real scored records every ``max_staleness`` steps."""
    c, res, bs = cfg.cluster, cfg.cluster.learner_resources, cfg.learner.batch_size
    if not records:
        raise RuntimeError("no scored records to train on (every scored sample was dropped)")
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(c.buffer_capacity, c.max_staleness,
                                                                 c.recency_bias, cfg.run.seed)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    host = ray.remote(LearnerHost).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
        cfg, str(run_dir), buffer, store)
    version = 0
    ray.get(host.ping.remote())
    chunk = max(1, min(c.max_staleness, c.buffer_capacity // bs))
    busy, trained, points, k = 0.0, 0.0, [], 0
    while len(points) < warmup + steps + 1:
        entries = []
        for _ in range(chunk * bs):
            meta, ref = records[k % len(records)]
            k += 1
            entries.append(BufferEntry(meta=SampleMeta(**{**meta, "sample_id": new_sample_id("bench", version),
                                                          "policy_version": version}), ref=ref))
        ray.get(buffer.add.remote(entries))
        for _ in range(chunk):
            t0 = time.perf_counter()
            out = ray.get(host.run.remote(1, 5.0))
            busy += time.perf_counter() - t0
            if not out:
                raise RuntimeError("learner host trained nothing from a filled buffer")
            trained += sum(s["samples"] for s in out)
            version = int(out[-1]["policy_version"])
            points.append((busy, trained))
    kill(host, buffer, store)
    rate, counted, seconds = steady_rate(points, warmup)
    return {"rate": rate, "counted": counted, "seconds": seconds}


# ------------------------------------------------------------------------------------ weight sync
class BenchSampler(SamplerActor):
    """The real sampler actor plus ``sync_now()``: exactly the sync it runs before every batch."""

    def sync_now(self) -> dict[str, Any]:
        before = self.counts["syncs"]
        self._sync()
        return {"version": self.version, "synced": self.counts["syncs"] > before}


class StateHolder:
    """A sampler stand-in holding an arbitrary state dict (for the INFO size sweep only)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], store: Any):
        self.state = {k: torch.zeros(s) for k, s in shapes.items()}
        self.store, self.version = store, -1

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor], version: int) -> None:
        for k, p in self.state.items():
            p.copy_(state[k])

    def sync_now(self) -> dict[str, Any]:
        res = maybe_sync(self.store, self.version, self.load)
        self.version = int(res)
        return {"version": self.version, "synced": res.synced}


def _sync_loop(store: Any, receivers: list[Any], state: dict[str, torch.Tensor], local_load: Any,
               warmup: int, reps: int) -> dict[str, Any]:
    t_local, t_remote, t_publish = [], [], []
    for r in range(warmup + reps):
        v = r + 1
        t0 = time.perf_counter()
        local_load(state, v)
        t1 = time.perf_counter()
        publish_state(store, v, state)
        t2 = time.perf_counter()
        res = ray.get([s.sync_now.remote() for s in receivers])
        t3 = time.perf_counter()
        if not all(x["synced"] and x["version"] == v for x in res):
            raise RuntimeError(f"a sampler did not load version {v}: {res}")
        if r >= warmup:
            t_local.append(t1 - t0)
            t_remote.append(t3 - t1)
            t_publish.append(t2 - t1)
    return {"local_s": median(t_local), "remote_s": median(t_remote), "publish_s": median(t_publish),
            "ratio": median(t_remote) / median(t_local), "nbytes": state_nbytes(state)}


def bench_weight_sync(cfg: SRUMConfig, warmup: int, reps: int) -> dict[str, Any]:
    """publish_state + maybe_sync into 2 real sampler actors vs one in-process load_trainable_state."""
    res = cfg.cluster.sampler_resources
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    samplers = [ray.remote(BenchSampler).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
        cfg, f"sync-{i}", store) for i in range(2)]
    ray.get([s.ping.remote() for s in samplers])
    src = Policy.from_config(cfg.policy, seed=cfg.run.seed)
    dst = Policy.from_config(cfg.policy, seed=cfg.run.seed + 1)
    _, state = src.trainable_state()
    try:
        return _sync_loop(store, samplers, state, dst.load_trainable_state, warmup, reps)
    finally:
        kill(*samplers, store)


def bench_sync_size(nbytes: int, n_tensors: int, warmup: int, reps: int, num_cpus: float) -> dict[str, Any]:
    """Same publish/sync path for a synthetic float32 state of ``nbytes`` (INFO: fixed vs per-byte cost)."""
    per = max(1, nbytes // 4 // n_tensors)
    shapes = {f"w{i}": (per,) for i in range(n_tensors)}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    local = StateHolder(shapes, None)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    holders = [ray.remote(StateHolder).options(num_cpus=num_cpus).remote(shapes, store) for _ in range(2)]
    try:
        return _sync_loop(store, holders, state, local.load, warmup, reps)
    finally:
        kill(*holders, store)


# ------------------------------------------------------------------------------------------ main
def result_line(name: str, value: float, contended: bool = False) -> str:
    """``RESULT <name> <value> target=<t> ok=<bool>``; ok is false for a contended measurement."""
    op, target = TARGETS[name]
    ok = value >= target if op == ">=" else value <= target
    if not math.isfinite(value) or contended:
        ok = False
    return f"RESULT {name} {value:.3f} target={target:g} ok={'true' if ok else 'false'}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(CONFIG), help="base config (the benchmark's overrides go on top)")
    ap.add_argument("--reps", type=int, default=2, help="online/sequential repetitions per scenario (medians)")
    ap.add_argument("--warmup", type=int, default=4, help="learner steps (or batches) excluded as warm-up")
    ap.add_argument("--steps-lat", type=int, default=30, help="measured learner steps, lat200 scenario")
    ap.add_argument("--steps-nolat", type=int, default=16, help="measured learner steps, nolat scenario")
    ap.add_argument("--stage-batches", type=int, default=16, help="measured batches/steps per stage alone")
    ap.add_argument("--proposer", default="none", choices=["none", "sam"])
    ap.add_argument("--judge-mode", default="text", choices=["text", "structured"])
    ap.add_argument("--latency", type=float, default=0.2, help="fake judge latency per request (s)")
    ap.add_argument("--samplers", type=int, default=2)
    ap.add_argument("--scorers", type=int, default=1)
    ap.add_argument("--in-flight", type=int, default=4, help="cluster.max_in_flight_batches")
    ap.add_argument("--batch", type=int, default=4, help="sample and learner batch size")
    ap.add_argument("--sync-reps", type=int, default=30)
    ap.add_argument("--sync-sizes-mb", default="1,16,64", help="INFO sweep of synthetic state sizes ('' = off)")
    ap.add_argument("--efficiency-scenario", default="lat200", choices=["lat200", "nolat"])
    ap.add_argument("--scenarios", default="lat200,nolat")
    ap.add_argument("--num-cpus", type=float, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (repeatable), e.g. cluster.max_staleness=8")
    ap.add_argument("--contention-limit", type=float, default=0.25,
                    help="cores other processes may use in a measured window before it is measured again")
    ap.add_argument("--tries", type=int, default=2, help="attempts per measurement under contention")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--skip-stages", action="store_true", help="no stage-alone runs (no efficiency figure)")
    ap.add_argument("--skip-sync", action="store_true", help="no weight-sync figures")
    return ap.parse_args(argv)


def measured(fn: Any, label: str, limit: float, tries: int) -> dict[str, Any]:
    """Run ``fn() -> result with "cpu"`` until the cores used by processes outside this benchmark in its
    window stay <= ``limit`` (at most ``tries`` times); the last result gets ``contended=True`` if not."""
    for attempt in range(tries):
        r = fn()
        o = r["cpu"].get("others", 0.0)
        r["contended"] = o > limit
        if not r["contended"]:
            return r
        log(f"   ({label}: other processes used {o:.2f} cores in the measured window"
            f"{', measuring again' if attempt + 1 < tries else '; keeping it, marked contended'})")
    return r


def compare(args: argparse.Namespace, scenario: str, cfg: SRUMConfig, driver_log: Path,
            others: list[float]) -> tuple[float, float, bool]:
    """Alternate sequential and online runs ``args.reps`` times; returns the median rates (seq, online)
    and whether any kept window was contended by other processes."""
    steps = args.steps_lat if scenario == "lat200" else args.steps_nolat
    seq, onl, contended = [], [], False
    for rep in range(args.reps):
        for what in (("seq", "online") if rep % 2 == 0 else ("online", "seq")):
            if what == "seq":
                def one_seq() -> dict[str, Any]:
                    # the faster torch thread count, probed right before each run
                    threads, probe = choose_threads(cfg)
                    return {**run_sequential(cfg, args.warmup, steps, threads), "threads": threads, "probe": probe}

                r = measured(one_seq, f"rep {rep} sequential", args.contention_limit, args.tries)
                seq.append(r["rate"])
                st = r["stage_s"]
                probe_s = ", ".join(f"{k} thr {v:.3f} s" for k, v in sorted(r["probe"].items()))
                log(f"   rep {rep} sequential ({r['threads']} thr): {r['rate']:.2f} samples/s ({r['counted']:.0f} in "
                    f"{r['seconds']:.1f} s; per batch sample {st['sample']:.3f} s, score {st['score']:.3f} s, "
                    f"train {st['train']:.3f} s; thread probe, sample batch: {probe_s})")
            else:
                def one_online(rep: int = rep) -> dict[str, Any]:
                    rc = cfg.model_copy(deep=True)
                    rc.run.name = f"bench-{scenario}-{rep}-{time.monotonic_ns()}"
                    return run_online(rc, args.warmup, steps, driver_log)

                r = measured(one_online, f"rep {rep} online", args.contention_limit, args.tries)
                onl.append(r["rate"])
                log(f"   rep {rep} online:           {r['rate']:.2f} samples/s ({r['counted']:.0f} in "
                    f"{r['seconds']:.1f} s; run wall {r['wall_s']:.1f} s; generated {r['generated']} trained "
                    f"{r['trained']} dropped {r['dropped']} max_lag {r['max_lag']} invariant_ok {r['invariant_ok']})")
            others.append(r["cpu"].get("others", float("nan")))
            contended |= r["contended"]
            log(f"      CPU cores: {format_usage(r['cpu'])}")
    return median(seq), median(onl), contended


def stages_alone(args: argparse.Namespace, scenario: str, cfg: SRUMConfig, out_dir: Path) -> dict[str, float]:
    """Rates (samples/s) of the sampler, scorer and learner stages, each alone."""
    sb = args.stage_batches
    s_res, inputs = stage_samplers(cfg, args.warmup, sb)
    c_res, records = stage_scorers(cfg, inputs, args.warmup, sb)
    l_res = stage_learner(cfg, records, args.warmup, sb, out_dir / f"learner-alone-{scenario}")
    rates = {"sampler": s_res["rate"], "scorer": c_res["rate"], "learner": l_res["rate"]}
    log(f"   stages alone (samples/s): samplers x{cfg.cluster.num_samplers} {rates['sampler']:.2f} "
        f"(in flight {s_res['in_flight']}), scorers x{cfg.cluster.num_scorers} {rates['scorer']:.2f} "
        f"(in flight {c_res['in_flight']}), learner {rates['learner']:.2f}")
    return rates


def weight_sync(args: argparse.Namespace, out_dir: Path, results: dict[str, float]) -> None:
    log("\n== weight sync: publish_state + maybe_sync into 2 sampler actors vs in-process load_trainable_state")
    cfg = None
    for lora, name in ((0, "weight_sync_ratio_full"), (8, "weight_sync_ratio_lora")):
        cfg = scenario_config(args, "nolat", out_dir, None, [f"policy.lora_rank={lora}"])
        r = bench_weight_sync(cfg, 3, args.sync_reps)
        results[name] = r["ratio"]
        log(f"   {'LoRA r=8' if lora else 'full FT '}: {r['nbytes'] / 1e6:.3f} MB; 2 samplers "
            f"{r['remote_s'] * 1e3:.2f} ms (of which publish {r['publish_s'] * 1e3:.2f} ms) vs in-process "
            f"{r['local_s'] * 1e3:.3f} ms -> ratio {r['ratio']:.1f} (medians of {args.sync_reps})")
    for mb in [float(x) for x in args.sync_sizes_mb.split(",") if x]:
        r = bench_sync_size(int(mb * 1e6), 16, 2, 7, cfg.cluster.sampler_resources.num_cpus)
        log(f"   INFO synthetic {mb:g} MB float32 (16 tensors), same path: 2 samplers {r['remote_s'] * 1e3:.2f} ms "
            f"(publish {r['publish_s'] * 1e3:.2f} ms) vs in-process {r['local_s'] * 1e3:.2f} ms -> ratio {r['ratio']:.2f}")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    load0 = os.getloadavg()
    log(f"host: {platform.processor() or platform.machine()} cores={os.cpu_count()} torch {torch.__version__} "
        f"threads={torch.get_num_threads()} ray {ray.__version__}; load average at start "
        f"{load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    out_dir = Path(tempfile.mkdtemp(prefix="srum-bench-pipeline-"))
    driver_log = out_dir / "driver.log"
    results: dict[str, float] = {}
    others: list[float] = []  # cores used by processes outside this benchmark, per measured window
    contended: set[str] = set()  # figures measured while other processes held CPU
    with JudgeServerProcess(args.latency, stderr_path=out_dir / "judge_server.log") as server:
        # address="local": a new cluster of our own even when another `ray start` cluster runs here
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, namespace=NAMESPACE,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        # after ray.init (which installs its own SIGTERM handler): unwind, shut Ray down, stop the server
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            for scenario in [s for s in args.scenarios.split(",") if s]:
                cfg = scenario_config(args, scenario, out_dir, server.base_url)
                log(f"\n== {scenario}: {describe(cfg)}")
                if scenario == "lat200":
                    log(f"   judge latency {args.latency * 1e3:.0f} ms per request (fake OpenAI server, child process)")
                seq, onl, cont = compare(args, scenario, cfg, driver_log, others)
                name = "pipeline_speedup_latency200ms" if scenario == "lat200" else "pipeline_speedup_nolatency"
                results[name] = onl / seq
                if cont:
                    contended.add(name)
                log(f"   {name}: online {onl:.2f} / sequential {seq:.2f} = {onl / seq:.2f}x")
                if args.skip_stages:
                    continue
                with CpuMonitor() as cpu:
                    t0 = time.time()
                    rates = stages_alone(args, scenario, cfg, out_dir)
                stage_others = cpu.usage(t0, time.time()).get("others", 0.0)
                others.append(stage_others)
                log(f"   (other processes used {stage_others:.2f} cores during the stage-alone runs, start-up included)")
                slowest = min(rates, key=rates.get)
                log(f"   efficiency ({scenario}): online {onl:.2f} / {slowest} alone {rates[slowest]:.2f} "
                    f"= {onl / rates[slowest]:.3f}")
                if scenario == args.efficiency_scenario:
                    results["pipeline_efficiency"] = onl / rates[slowest]
                    if cont or stage_others > args.contention_limit:
                        contended.add("pipeline_efficiency")
            if not args.skip_sync:
                with CpuMonitor() as cpu:
                    t0 = time.time()
                    weight_sync(args, out_dir, results)
                sync_others = cpu.usage(t0, time.time()).get("others", 0.0)
                others.append(sync_others)
                log(f"   (other processes used {sync_others:.2f} cores during the weight-sync runs)")
                if sync_others > args.contention_limit:
                    contended.update({"weight_sync_ratio_full", "weight_sync_ratio_lora"})
        finally:
            ray.shutdown()
    load1 = os.getloadavg()
    valid = [o for o in others if math.isfinite(o)]
    log(f"\nload average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; other processes used "
        f"{median(valid) if valid else float('nan'):.2f} cores (median; max {max(valid, default=float('nan')):.2f}) "
        f"during the measured windows; total {time.monotonic() - t_start:.0f} s; fake judge server: "
        f"{server.final_line}; outputs in {out_dir}{'' if args.keep_outputs else ' (removed)'}")
    if contended:
        log(f"WARNING: {', '.join(sorted(contended))} measured while other processes used more than "
            f"{args.contention_limit:.2f} cores (after {args.tries} tries): not trustworthy, reported ok=false")
    if not args.keep_outputs:
        shutil.rmtree(out_dir, ignore_errors=True)
    for name in TARGETS:
        if name in results:
            log(result_line(name, results[name], name in contended))
    return 0


if __name__ == "__main__":
    sys.exit(main())
