"""Benchmark: the online Ray loop vs the same work done sequentially, and pipeline efficiency.

Side by side in one run, tiny models on CPU (issue 5, "Benchmarks"):

1. **Online vs sequential** samples trained per second. *Online*: the real :class:`cluster.driver.Driver`
   (sampler, scorer and learner actors, replay buffer, weight store) on a local Ray bound to 127.0.0.1.
   *Sequential*: the in-process reference loop (:func:`srum.local.run_local`: generate -> score ->
   buffer -> collate -> train, the same functions the actors wrap) with the same config, batch sizes
   and prompts, at the faster torch thread count (default or 1, probed before each run: two OpenMP threads
   collapse when another process holds one of the two cores; the actors run one thread each). Scenarios:
   ``lat200`` (``judge.backend=openai`` against the tests' fake OpenAI server in a child process that
   sleeps 200 ms per request), ``lat0`` (the same server answering at once) and ``nolat`` (the
   in-process tiny transformers judge). Targets: ``pipeline_speedup_latency200ms`` >= 1.8 (the loop is
   CPU-bound on two cores once the wait is hidden: 3x is out of reach there), ``pipeline_speedup_nolatency``
   >= 1.0.
2. **Latency hidden**: online trained/s with the 200 ms judge / online with the 0 ms judge
   (``judge_latency_hidden`` >= 0.95: the pipeline hides the judge's wait).
3. **Pipeline efficiency**: online trained/s divided by the slowest stage's rate measured alone with
   the same actors, options and in-flight bounds as the driver uses (samplers alone, scorers alone
   fed pre-generated batches, learner host alone fed a pre-filled replay buffer), each stage's rate
   scaled by the CPU share it gets in the loop (alone it has the machine; in the loop it shares two
   cores with the other stages, measured per actor by the CPU monitor). Target >= 0.85.
4. **Stale work**: samples dropped as stale or evicted unread / samples generated in the online lat200
   run (``stale_drop_fraction`` <= 0.02: generation is bounded by what the learner consumes,
   ``cluster.ahead_batches``).
(Weight sync has its own benchmark, ``bench/weight_sync.py``.) The driver's own CPU time per learner
batch is printed with every online run (``driver cpu/batch``), the figure that shows what the driver
costs.

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

from actors.learner_host import LearnerHost  # noqa: E402
from actors.sampler import SamplerActor  # noqa: E402
from actors.scorer import ScorerActor  # noqa: E402
from actors.weights import WeightStore  # noqa: E402
from cluster.control import NAMESPACE  # noqa: E402
from cluster.driver import Driver  # noqa: E402
from core.config import SRUMConfig  # noqa: E402
from core.config_io import load_config  # noqa: E402
from core.prompt_sets import PromptCycler  # noqa: E402
from core.records import TrainSample, new_sample_id  # noqa: E402
from srum.local import run_local  # noqa: E402
from srum.registry import compose  # noqa: E402

CONFIG = ROOT / "configs" / "tiny_sd3.yaml"  # tiny SD3 policy, tiny transformers judge, tiny SAM
TARGETS = {
    "pipeline_speedup_latency200ms": (">=", 1.8),
    "pipeline_speedup_nolatency": (">=", 1.0),
    "judge_latency_hidden": (">=", 0.95),
    "pipeline_efficiency": (">=", 0.85),
    "stale_drop_fraction": ("<=", 0.02),
}
STAGE_ROLES = {"sampler": "SamplerActor", "scorer": "ScorerActor", "learner": "LearnerHost"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ config
def scenario_config(args: argparse.Namespace, scenario: str, out_dir: Path, judge_url: str | None,
                    extra: Sequence[str] = ()) -> SRUMConfig:
    """``args.config`` (default configs/tiny_sd3.yaml) plus the benchmark's overrides; ``scenario`` is "lat200"
    (the fake OpenAI judge answering after 200 ms), "lat0" (the same judge without latency) or "nolat" (the
    in-process tiny VLM judge)."""
    over = [
        f"run.output_dir={out_dir}", "learner.checkpoint_every=0",
        f"regions.proposer={args.proposer}",
        f"cluster.num_samplers={args.samplers}", f"cluster.num_scorers={args.scorers}",
        f"cluster.max_in_flight_batches={args.in_flight}",
        f"cluster.sample_batch_size={args.batch}", f"learner.batch_size={args.batch}",
    ]
    if scenario in ("lat200", "lat0"):
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
    policy = compose(cfg).policy()
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


def _run_sequential(cfg: SRUMConfig, warmup: int, steps: int) -> dict[str, Any]:
    cfg = cfg.model_copy(deep=True)
    cfg.run.max_steps = warmup + steps + 1
    with CpuMonitor() as cpu:
        run = run_local(cfg)
    points, trained = [], 0.0
    for r in run.steps:
        trained += r["samples"]
        points.append((r["time"], trained))
    rate, counted, seconds = steady_rate(points, warmup)
    kept = run.steps[warmup + 1:] or run.steps
    per_batch = len(kept) * cfg.learner.batch_size / cfg.cluster.sample_batch_size
    return {"rate": rate, "counted": counted, "seconds": seconds,
            "stage_s": {"sample": sum(r["sample_s"] for r in kept) / per_batch,
                        "score": sum(r["score_s"] for r in kept) / per_batch,
                        "train": median([r["train_s"] for r in kept])},
            "cpu": cpu.usage(points[warmup][0], points[-1][0])}


# ---------------------------------------------------------------------------------------- online
def run_online(cfg: SRUMConfig, warmup: int, steps: int, log_path: Path) -> dict[str, Any]:
    """The real Driver for ``warmup + steps + 1`` learner steps; the rate comes from metrics.jsonl."""
    cfg = cfg.model_copy(deep=True)
    cfg.run.max_steps = warmup + steps + 1
    t0 = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as out, contextlib.redirect_stdout(out), CpuMonitor() as cpu:
        driver = Driver(cfg, compose(cfg))
        try:
            status = driver.run()
        finally:
            kill(*(h for h in (driver.learner, driver.store) if h is not None))
    points = read_train_points(driver.run_dir / "metrics.jsonl")
    rate, counted, seconds = steady_rate(points, warmup)
    buf = status["buffer"]
    usage = cpu.usage(points[warmup][0], points[-1][0])
    batches = counted / cfg.learner.batch_size
    return {"rate": rate, "counted": counted, "seconds": seconds, "wall_s": time.monotonic() - t0,
            "dropped": dict(buf.get("dropped", {})), "generated": buf.get("generated"),
            "trained": buf.get("trained"), "max_lag": status.get("max_lag"), "invariant_ok": status["invariant_ok"],
            "cpu": usage, "driver_cpu_per_batch": usage.get("driver", 0.0) * seconds / max(batches, 1e-9)}


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
            finished.append(time.time())  # wall time: the CPU monitor's clock
    return finished


def stage_samplers(cfg: SRUMConfig, warmup: int, batches: int) -> tuple[dict[str, Any], list[Any]]:
    """Sampler actors alone, as the driver creates and feeds them. Returns the rate and some
    (header, batch ref) pairs for the scorers."""
    c, res, parts = cfg.cluster, cfg.cluster.sampler_resources, compose(cfg)
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    actors = [ray.remote(SamplerActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
        parts, f"sampler-{i}", store) for i in range(c.num_samplers)]
    ray.get([a.ping.remote() for a in actors])
    prompts = PromptCycler(parts.train_prompts(), cfg.run.seed, c.prompts.shuffle)
    load = [0] * len(actors)
    owner: dict[Any, tuple[int, Any]] = {}
    kept: list[Any] = []

    def submit() -> Any:
        i = min(range(len(actors)), key=lambda k: load[k])
        recs, seeds = prompts.take(c.sample_batch_size)
        header_ref, batch_ref = actors[i].sample.options(num_returns=2).remote(recs, seeds)
        owner[header_ref] = (i, batch_ref)
        load[i] += 1
        return header_ref

    def done(ref: Any) -> None:
        i, batch_ref = owner.pop(ref)
        load[i] -= 1
        header = ray.get(ref)
        if len(kept) < 8:
            kept.append((header, batch_ref))

    cap = min(c.sampler_calls_in_flight * len(actors), c.max_in_flight_batches)
    times = _drive(submit, warmup + cap * max(1, math.ceil(batches / cap)) + 1, cap, done)
    kill(*actors, store)
    n = c.sample_batch_size
    points = generation_window([(t, (k + 1) * n) for k, t in enumerate(times)], warmup, cap)
    rate, counted, seconds = steady_rate(points, warmup)
    return {"rate": rate, "counted": counted, "seconds": seconds, "in_flight": cap,
            "window": (points[warmup][0], points[-1][0])}, kept


def stage_scorers(cfg: SRUMConfig, inputs: list[Any], warmup: int,
                  batches: int) -> tuple[dict[str, Any], list[TrainSample]]:
    """Scorer actors alone, fed pre-generated sampler outputs. Returns the rate and trainable samples
    (tensors by reference)."""
    c, res, parts = cfg.cluster, cfg.cluster.scorer_resources, compose(cfg)
    actors = [ray.remote(ScorerActor).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                              max_concurrency=c.scorer_concurrency).remote(parts, f"scorer-{i}")
              for i in range(c.num_scorers)]
    ray.get([a.start.remote() for a in actors])
    n = c.sample_batch_size
    load = [0] * len(actors)
    owner: dict[Any, tuple[int, list[Any]]] = {}
    samples: list[TrainSample] = []
    counter = [0]

    def submit() -> Any:
        i = min(range(len(actors)), key=lambda k: load[k])
        header, batch_ref = inputs[counter[0] % len(inputs)]
        counter[0] += 1
        summary_ref, *tensor_refs = actors[i].score.options(num_returns=1 + n).remote(header, batch_ref)
        owner[summary_ref] = (i, tensor_refs)
        load[i] += 1
        return summary_ref

    def done(ref: Any) -> None:
        i, tensor_refs = owner.pop(ref)
        load[i] -= 1
        summary = ray.get(ref)
        if len(samples) < 32:
            samples.extend(TrainSample(r, t) for r, t in zip(summary.records, tensor_refs, strict=True) if not r.dropped)

    cap = min(c.scorer_calls_in_flight * len(actors), c.max_in_flight_batches)
    times = _drive(submit, warmup + cap * max(1, math.ceil(batches / cap)) + 1, cap, done)
    kill(*actors)
    points = generation_window([(t, (k + 1) * n) for k, t in enumerate(times)], warmup, cap)
    rate, counted, seconds = steady_rate(points, warmup)
    return {"rate": rate, "counted": counted, "seconds": seconds, "in_flight": cap,
            "window": (points[warmup][0], points[-1][0])}, samples


def stage_learner(cfg: SRUMConfig, samples: list[TrainSample], warmup: int, steps: int,
                  run_dir: Path) -> dict[str, Any]:
    """The learner host alone, one ``train`` call of one batch per step as the driver makes them, fed real
    scored samples (tensors by reference) relabelled with fresh ids at the learner's version."""
    res, bs = cfg.cluster.learner_resources, cfg.learner.batch_size
    if not samples:
        raise RuntimeError("no scored samples to train on (every scored sample was dropped)")
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    host = ray.remote(LearnerHost).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus).remote(
        compose(cfg), str(run_dir), store)
    version = 0
    ray.get(host.ping.remote())
    busy, trained, points, k, walls = 0.0, 0.0, [], 0, []
    while len(points) < warmup + steps + 1:
        batch = []
        for _ in range(bs):
            s = samples[k % len(samples)]
            k += 1
            rec = s.record.model_copy(update={"sample_id": new_sample_id("bench", version), "policy_version": version})
            batch.append(TrainSample(rec, s.tensors))
        t0 = time.perf_counter()
        result = ray.get(host.train.remote([batch]))
        busy += time.perf_counter() - t0
        if not result.steps:
            raise RuntimeError(f"learner host trained nothing from a full batch (lost {result.lost})")
        trained += sum(st["samples"] for st in result.steps)
        version = int(result.steps[-1]["policy_version"])
        points.append((busy, trained))
        walls.append(time.time())
    kill(host, store)
    rate, counted, seconds = steady_rate(points, warmup)
    return {"rate": rate, "counted": counted, "seconds": seconds, "window": (walls[warmup], walls[-1])}


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
    ap.add_argument("--efficiency-scenario", default="lat200", choices=["lat200", "nolat"])
    ap.add_argument("--scenarios", default="lat200,lat0,nolat")
    ap.add_argument("--num-cpus", type=float, default=4)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for every run (repeatable), e.g. cluster.max_staleness=8")
    ap.add_argument("--contention-limit", type=float, default=0.25,
                    help="cores other processes may use in a measured window before it is measured again")
    ap.add_argument("--tries", type=int, default=2, help="attempts per measurement under contention")
    ap.add_argument("--keep-outputs", action="store_true", help="keep the temporary run directory")
    ap.add_argument("--skip-stages", action="store_true", help="no stage-alone runs (no efficiency figure)")
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
            others: list[float]) -> tuple[float, float, bool, list[dict[str, Any]]]:
    """Alternate sequential and online runs ``args.reps`` times; returns the median rates (seq, online),
    whether any kept window was contended by other processes, and the online runs."""
    steps = args.steps_lat if scenario.startswith("lat") else args.steps_nolat
    seq, onl, contended, runs = [], [], False, []
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
                runs.append(r)
                log(f"   rep {rep} online:           {r['rate']:.2f} samples/s ({r['counted']:.0f} in "
                    f"{r['seconds']:.1f} s; run wall {r['wall_s']:.1f} s; generated {r['generated']} trained "
                    f"{r['trained']} dropped {r['dropped']} max_lag {r['max_lag']} invariant_ok {r['invariant_ok']}; "
                    f"driver cpu/batch {r['driver_cpu_per_batch'] * 1e3:.1f} ms)")
            others.append(r["cpu"].get("others", float("nan")))
            contended |= r["contended"]
            log(f"      CPU cores: {format_usage(r['cpu'])}")
    return median(seq), median(onl), contended, runs


def stages_alone(args: argparse.Namespace, scenario: str, cfg: SRUMConfig, out_dir: Path,
                 cpu: CpuMonitor) -> dict[str, dict[str, float]]:
    """Each stage alone: its rate (samples/s) and the cores its actors used for it."""
    sb = args.stage_batches
    s_res, inputs = stage_samplers(cfg, args.warmup, sb)
    c_res, samples = stage_scorers(cfg, inputs, args.warmup, sb)
    l_res = stage_learner(cfg, samples, args.warmup, sb, out_dir / f"learner-alone-{scenario}")
    out = {}
    for stage, res in (("sampler", s_res), ("scorer", c_res), ("learner", l_res)):
        out[stage] = {"rate": res["rate"], "cores": cpu.usage(*res["window"]).get(STAGE_ROLES[stage], float("nan"))}
    log(f"   stages alone (samples/s, cores): samplers x{cfg.cluster.num_samplers} {out['sampler']['rate']:.2f} "
        f"({out['sampler']['cores']:.2f}; in flight {s_res['in_flight']}), scorers x{cfg.cluster.num_scorers} "
        f"{out['scorer']['rate']:.2f} ({out['scorer']['cores']:.2f}; in flight {c_res['in_flight']}), learner "
        f"{out['learner']['rate']:.2f} ({out['learner']['cores']:.2f})")
    return out


def efficiency(online: float, loop_cpu: dict[str, float], alone: dict[str, dict[str, float]]) -> tuple[float, str]:
    """Online rate over the slowest stage's capacity with the CPU it had in the loop: a stage that made
    ``rate`` samples/s with ``cores`` alone makes ``rate * loop_cores / cores`` with its share of the loop
    (CPU-bound stages; on 2 shared cores no stage gets the whole machine in the loop)."""
    capacity = {stage: a["rate"] * min(1.0, loop_cpu.get(STAGE_ROLES[stage], 0.0) / a["cores"])
                if a["cores"] > 0 else a["rate"] for stage, a in alone.items()}
    slowest = min(capacity, key=capacity.get)
    log("   capacity with the loop's CPU (samples/s): " + ", ".join(
        f"{k} {v:.2f} ({loop_cpu.get(STAGE_ROLES[k], 0.0):.2f} cores in the loop)" for k, v in capacity.items()))
    return online / capacity[slowest], slowest


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
    with JudgeServerProcess(args.latency, stderr_path=out_dir / "judge_server.log") as server, \
            JudgeServerProcess(0.0, stderr_path=out_dir / "judge_server0.log") as server0:
        # address="local": a new cluster of our own even when another `ray start` cluster runs here
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, namespace=NAMESPACE,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        # after ray.init (which installs its own SIGTERM handler): unwind, shut Ray down, stop the servers
        signal.signal(signal.SIGTERM, _interrupt)
        online: dict[str, float] = {}
        try:
            for scenario in [s for s in args.scenarios.split(",") if s]:
                url = server0.base_url if scenario == "lat0" else server.base_url
                cfg = scenario_config(args, scenario, out_dir, url)
                log(f"\n== {scenario}: {describe(cfg)}")
                if scenario.startswith("lat"):
                    latency = 0.0 if scenario == "lat0" else args.latency
                    log(f"   judge latency {latency * 1e3:.0f} ms per request (fake OpenAI server, child process)")
                seq, onl, cont, runs = compare(args, scenario, cfg, driver_log, others)
                online[scenario] = onl
                if scenario != "lat0":
                    name = "pipeline_speedup_latency200ms" if scenario == "lat200" else "pipeline_speedup_nolatency"
                    results[name] = onl / seq
                    if cont:
                        contended.add(name)
                    log(f"   {name}: online {onl:.2f} / sequential {seq:.2f} = {onl / seq:.2f}x")
                if scenario == args.efficiency_scenario:
                    generated = sum(r["generated"] or 0 for r in runs)
                    wasted = sum(r["dropped"].get(k, 0) for r in runs for k in ("stale", "evicted"))
                    results["stale_drop_fraction"] = wasted / max(1, generated)
                    log(f"   stale or evicted: {wasted} of {generated} generated samples")
                if args.skip_stages or scenario != args.efficiency_scenario:
                    continue
                with CpuMonitor() as cpu:
                    t0 = time.time()
                    alone = stages_alone(args, scenario, cfg, out_dir, cpu)
                stage_others = cpu.usage(t0, time.time()).get("others", 0.0)
                others.append(stage_others)
                log(f"   (other processes used {stage_others:.2f} cores during the stage-alone runs, start-up included)")
                loop_cpu = {k: median([r["cpu"].get(k, 0.0) for r in runs]) for k in STAGE_ROLES.values()}
                eff, slowest = efficiency(onl, loop_cpu, alone)
                log(f"   efficiency ({scenario}): online {onl:.2f} / {slowest}'s capacity in the loop = {eff:.3f}")
                results["pipeline_efficiency"] = eff
                if cont or stage_others > args.contention_limit:
                    contended.add("pipeline_efficiency")
            if "lat200" in online and "lat0" in online:
                results["judge_latency_hidden"] = online["lat200"] / online["lat0"]
                log(f"\njudge latency hidden: online with a 200 ms judge {online['lat200']:.2f} / with a 0 ms judge "
                    f"{online['lat0']:.2f} = {results['judge_latency_hidden']:.3f}")
        finally:
            ray.shutdown()
    load1 = os.getloadavg()
    valid = [o for o in others if math.isfinite(o)]
    log(f"\nload average at end {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}; other processes used "
        f"{median(valid) if valid else float('nan'):.2f} cores (median; max {max(valid, default=float('nan')):.2f}) "
        f"during the measured windows; total {time.monotonic() - t_start:.0f} s; fake judge server: "
        f"{server.final_line} / {server0.final_line}; outputs in {out_dir}{'' if args.keep_outputs else ' (removed)'}")
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
