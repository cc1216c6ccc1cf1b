"""The two halves of a rollout, as plain functions: the sampler and scorer actors wrap them, and the
in-process loop (:func:`srum.local.run_local`, the benchmarks) calls them directly.

- :func:`generate`: the policy samples one image per (prompt, seed) -> a :class:`SampleHeader` and the
  :class:`SampleBatch` (images + clean latents);
- :func:`score`: the scorer judges every image -> one :class:`TrainSample` per image (a dropped sample
  carries its :class:`DropReason` and no tensors), plus a preview for the gallery.

:func:`rollout` is both in one call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.prompt_sets import PromptRecord
from core.records import SampleHeader, SampleRecord, SampleTensors, TrainSample, new_sample_id
from learner.base import Policy, SampleBatch
from rewards.scorer import SampleScorer, ScoredSample

__all__ = ["Preview", "ScoredBatch", "arollout", "generate", "rollout", "score"]

PREVIEW_MAX_SIDE = 256  # the gallery shows at most this many pixels per side


@dataclass
class Preview:
    """One sample as the gallery shows it: the image (shrunk by ``stride`` for large images; the record's
    boxes are in full-image pixels), its record and the reward map at image resolution."""

    image: np.ndarray
    record: SampleRecord
    R: np.ndarray | None
    stride: int = 1


@dataclass
class ScoredBatch:
    """What :func:`score` returns: one sample per image (in order) and one preview."""

    samples: list[TrainSample]
    preview: Preview | None
    seconds: float


def generate(policy: Policy, prompts: Sequence[PromptRecord], seeds: Sequence[int], sampler_id: str = "local",
             lag: int = 0) -> tuple[SampleHeader, SampleBatch]:
    """Sample one image per (prompt, seed) with the policy's current weights."""
    t0 = time.perf_counter()
    batch = policy.sample([p.text for p in prompts], [int(s) for s in seeds])
    header = SampleHeader(sampler_id=sampler_id, policy_version=batch.version, lag=lag, prompts=tuple(prompts),
                          seeds=tuple(int(s) for s in seeds), sample_seconds=time.perf_counter() - t0)
    return header, batch


async def score(scorer: SampleScorer, header: SampleHeader, batch: SampleBatch) -> ScoredBatch:
    """Judge every image of a generated batch; never raises for a sample (failures are drop reasons)."""
    if len(batch.images) != header.n:
        raise ValueError(f"batch has {len(batch.images)} images for {header.n} prompts")
    t0 = time.perf_counter()
    images = list(batch.images.numpy())
    results = await scorer.score_many(images, [p.text for p in header.prompts], tuple(batch.x0.shape[-2:]))
    per_image = header.sample_seconds / max(1, header.n)
    samples = [_sample(header, batch, i, result, per_image) for i, result in enumerate(results)]
    first = results[0] if results else None
    stride = -(-max(images[0].shape[:2]) // PREVIEW_MAX_SIDE) if images else 1
    preview = None if first is None else Preview(
        image=np.ascontiguousarray(images[0][::stride, ::stride]), record=samples[0].record,
        R=None if first.reward_map is None else first.reward_map.R[::stride, ::stride].numpy(), stride=stride)
    return ScoredBatch(samples, preview, time.perf_counter() - t0)


async def arollout(policy: Policy, scorer: SampleScorer, prompts: Sequence[PromptRecord],
                   seeds: Sequence[int]) -> list[TrainSample]:
    """:func:`generate` then :func:`score`, inside a running event loop."""
    header, batch = generate(policy, prompts, seeds)
    return (await score(scorer, header, batch)).samples


def rollout(policy: Policy, scorer: SampleScorer, prompts: Sequence[PromptRecord],
            seeds: Sequence[int]) -> list[TrainSample]:
    """:func:`arollout` in its own event loop (for judges not bound to a loop; an OpenAI client is:
    call :func:`arollout` from one loop instead)."""
    return asyncio.run(arollout(policy, scorer, prompts, seeds))


def _sample(header: SampleHeader, batch: SampleBatch, i: int, result: ScoredSample,
            sample_seconds: float) -> TrainSample:
    record = SampleRecord(
        sample_id=new_sample_id(header.sampler_id, header.policy_version),
        prompt=header.prompts[i], seed=header.seeds[i], policy_version=header.policy_version,
        sampler_id=header.sampler_id, global_score=result.global_score, alpha=float(result.alpha),
        mean_R=float(result.R_latent.mean()) if result.R_latent is not None else 0.0,
        regions=list(result.regions), drop_reason=result.drop_reason, error=result.error,
        timings={"sample_s": sample_seconds, **result.timings},
    )
    if record.dropped:
        return TrainSample(record, None)
    return TrainSample(record, SampleTensors(x0=batch.x0[i].float().cpu().clone(), R=result.R_latent.float().cpu()))
