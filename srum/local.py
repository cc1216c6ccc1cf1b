"""The in-process reference loop: the same algorithm as the online service, in one process, read top to
bottom. The service splits exactly these phases across actors (:func:`actors.rollout.generate` in the
samplers, :func:`actors.rollout.score` in the scorers, :func:`core.records.collate` + ``train_step`` in
the learner host); the benchmarks call this loop for their sequential baseline and their experiments.

    python -m srum.local --config configs/default.yaml run.max_steps=20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from actors.components import Components
from actors.rollout import generate, score
from cluster.buffer import ReplayBuffer
from core.config import SRUMConfig
from core.config_io import load_config
from core.prompt_sets import PromptCycler
from core.records import SampleTensors, TrainSample, collate
from learner.base import Policy, SampleBatch
from learner.learner import Learner
from srum.registry import compose

__all__ = ["LocalRun", "run_local", "uniform_weights"]

MAX_EMPTY_ROLLOUTS = 50  # give up when this many rollouts in a row yield no trainable sample

Weighting = Literal["reward", "uniform"]


@dataclass
class LocalRun:
    """The trained policy and learner, the buffer's final accounting, one record per step and the
    held-out evaluations (when ``run.eval_every``)."""

    policy: Policy
    learner: Learner
    buffer: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)


def uniform_weights(samples: Sequence[TrainSample], batch: SampleBatch) -> list[TrainSample]:
    """The self-SFT baseline's view of a scored batch: every generated sample, weight 1 everywhere."""
    out = []
    for i, s in enumerate(samples):
        x0 = batch.x0[i].float().cpu().clone()
        rec = s.record.model_copy(update={"drop_reason": None, "alpha": 1.0, "mean_R": 1.0})
        out.append(TrainSample(rec, SampleTensors(x0=x0, R=torch.ones(x0.shape[-2:]))))
    return out


def run_local(cfg: SRUMConfig, components: Components | None = None, *, sampler: Policy | None = None,
              weighting: Weighting = "reward", on_step: Callable[[dict[str, Any]], None] | None = None,
              on_scored: Callable[[list[TrainSample], SampleBatch], None] | None = None) -> LocalRun:
    """Train ``run.max_steps`` learner steps in this process.

    ``sampler`` generates the training samples (default: the policy being trained, i.e. on-policy; a
    frozen copy of the base gives the paper's recipe). ``weighting="uniform"`` trains on every generated
    sample at weight 1 (the self-SFT baseline). ``on_step`` sees each step's record (``sample_ids``: the
    samples it trained on); ``on_scored`` sees every scored batch (the samples as the buffer gets them, and
    the generated batch with its images).
    """
    parts = components or compose(cfg)
    parts.prepare()
    policy = parts.policy()
    sampler = sampler or policy
    scorer = parts.scorer()
    learner = Learner(cfg, policy)
    evaluator = parts.evaluator() if cfg.run.eval_every else None
    c, bs = cfg.cluster, cfg.learner.batch_size
    buffer = ReplayBuffer(c.buffer_capacity, c.max_staleness, c.recency_bias, cfg.run.seed,
                          require_refs=False, metrics=False)
    prompts = PromptCycler(parts.train_prompts(), cfg.run.seed, c.prompts.shuffle)
    run = LocalRun(policy, learner, {})

    def evaluate() -> None:
        if evaluator is not None:
            run.evals.append({"step": learner.step, **evaluator.evaluate(policy)})

    async def loop() -> None:
        await scorer.judge.check_health()
        evaluate()
        while learner.step < cfg.run.max_steps:
            # 1. rollouts until the buffer holds a learner batch: generate, judge, map rewards
            t0, empty, scores = time.perf_counter(), 0, []
            timing = {"sample_s": 0.0, "score_s": 0.0}
            while buffer.size() < bs:
                records, seeds = prompts.take(c.sample_batch_size)
                header, batch = generate(sampler, records, seeds)
                scored = await score(scorer, header, batch)
                timing["sample_s"] += header.sample_seconds
                timing["score_s"] += scored.seconds
                scores += [s.record.global_score for s in scored.samples]
                samples = uniform_weights(scored.samples, batch) if weighting == "uniform" else scored.samples
                if on_scored is not None:
                    on_scored(samples, batch)
                empty = 0 if buffer.add(samples) else empty + 1
                if empty >= MAX_EMPTY_ROLLOUTS:
                    raise RuntimeError(f"{empty} rollouts in a row gave no trainable sample: {buffer.stats()['dropped']}")
            # 2. one learner step on a batch drawn from the buffer
            t1 = time.perf_counter()
            drawn = buffer.sample(bs, policy.version)
            stats = learner.train_step(collate(drawn))
            record = {**stats, **timing, "train_s": time.perf_counter() - t1, "rollout_s": t1 - t0,
                      "time": time.time(), "mean_global_score": _mean([s.record.global_score for s in drawn]),
                      "rollout_global_score": _mean(scores),  # every sample judged for this step, dropped too
                      "sample_ids": [s.sample_id for s in drawn]}
            run.steps.append(record)
            if on_step is not None:
                on_step(record)
            # 3. held-out evaluation every run.eval_every steps
            if cfg.run.eval_every and learner.step % cfg.run.eval_every == 0:
                evaluate()
        if not run.evals or run.evals[-1]["step"] != learner.step:
            evaluate()
        await scorer.judge.aclose()

    asyncio.run(loop())
    buffer.release()
    run.buffer = buffer.stats()
    return run


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m srum.local", description="The in-process reference SRUM loop.")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.max_steps=20")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    def show(r: dict[str, Any]) -> None:
        print(f"step {int(r['step'])} | loss {r['loss']:.4f} | g {r['mean_global_score'] or 0:+.2f} | "
              f"rollout {r['rollout_s']:.2f}s train {r['train_s']:.2f}s", flush=True)

    run = run_local(cfg, on_step=show)
    print(json.dumps({"buffer": run.buffer, "evals": run.evals}, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
