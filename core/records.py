"""The records a sample becomes on its way from the sampler to the loss, and why a sample can be dropped.

    Policy.sample ──► SampleHeader (by value) + SampleBatch (by reference) ──► scorer
    scorer ──► SampleRecord per image (by value, in its summary) + SampleTensors per image (one object each)
    driver ──► TrainSample(record, tensors ref) ──► replay buffer ──► learner: fetch + collate ──► TrainBatch

- :class:`SampleHeader`: what the driver reads of a generated batch (who made it, with which version,
  for which prompts and seeds); the images and latents (:class:`SampleBatch`, defined with the policy
  interface in :mod:`learner.base`) stay in the object store and go to a scorer by reference.
- :class:`SampleRecord`: everything known about one scored sample except its tensors; copied freely
  (driver, buffer, ``metrics.jsonl``, gallery). It is the one place the prompt, the policy version and
  the global weight ``alpha`` live.
- :class:`SampleTensors`: what the learner needs of one sample: the clean latent ``x0`` and the reward
  map ``R`` on the latent grid. Returned by the scorer as its own object, so the *driver* owns it (a
  scorer that dies later does not take buffered samples with it) and only its reference moves.
- :class:`TrainSample`: a record with its tensors, by reference (``ray.ObjectRef``) in the service or
  by value in the in-process loop; :func:`collate` turns resolved samples into the :class:`TrainBatch`
  the learner trains on, the only conversion on the way.

:class:`DropReason` names every way a generated sample leaves without being trained.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.prompt_sets import PromptRecord

__all__ = [
    "DropReason", "Region", "SampleHeader", "SampleRecord", "SampleTensors", "TrainBatch", "TrainSample",
    "collate", "new_sample_id",
]


class DropReason(StrEnum):
    """Why a generated sample was not trained on (the buffer counts each; ``srum_buffer_drops{reason}``)."""

    JUDGE_FAILED = "judge_failed"  # the judge (or the proposer) failed for it after retries
    JUDGE_AMBIGUOUS = "judge_ambiguous"  # a score was read only with a doubt, and judge.on_ambiguous is drop
    NO_GLOBAL_SCORE = "no_global_score"  # the global reward is in use and no global score could be read
    GLOBAL_SCORE_ZERO = "global_score_zero"  # official semantics: g == 0 exactly (the authors drop these)
    NO_SAMPLE_SCORE = "no_sample_score"  # sample granularity and no usable score at all
    SCORER_FAILED = "scorer_failed"  # the scorer actor failed the whole batch
    STALE = "stale"  # older than cluster.max_staleness learner versions
    EVICTED = "evicted"  # buffer overflow (oldest first)
    DUPLICATE = "duplicate"  # a sample id seen before
    LOST = "lost"  # drawn for training but never trained (its tensors were lost, or the learner failed the call)
    ROLLED_BACK = "rolled_back"  # trained, but the learner restarted from a checkpoint before that step
    RELEASED = "released"  # still in the buffer when the run ended
    SHUTDOWN = "shutdown"  # generated but still being scored when the run's drain time ran out


def new_sample_id(sampler_id: str = "s", policy_version: int = 0) -> str:
    """A unique, readable sample id: ``<sampler>-v<version>-<12 hex>``."""
    return f"{sampler_id}-v{policy_version}-{uuid.uuid4().hex[:12]}"


class Region(BaseModel):
    """One judged region: a pixel box and the judge's score for it (None when the judge gave none)."""

    model_config = ConfigDict(frozen=True)

    box: tuple[float, float, float, float] = Field(description="pixel box [x1, y1, x2, y2], x right, y down")
    score: float | None = Field(default=None, description="judge score in [-1, 1]; None = not scored")
    label: str = Field(default="", description="object the judge identified in the region")
    reason: str = Field(default="", description="judge's reason for the score")


class SampleHeader(BaseModel):
    """The small half of a generated batch (the images and latents travel separately, by reference)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sampler_id: str = Field(description="Id of the sampler actor that generated the batch.")
    policy_version: int = Field(ge=0, description="Weight version that generated it.")
    lag: int = Field(0, ge=0, description="Versions the sampler was behind the published weights.")
    prompts: tuple[PromptRecord, ...] = Field(description="One prompt record per image.")
    seeds: tuple[int, ...] = Field(description="One generation seed per image.")
    sample_seconds: float = Field(0.0, ge=0, description="Wall time of generating the batch.")

    @property
    def n(self) -> int:
        return len(self.prompts)


class SampleRecord(BaseModel):
    """One generated-and-scored sample, without its tensors."""

    model_config = ConfigDict(extra="forbid")

    sample_id: str = Field(min_length=1, description="Unique id of the sample (see new_sample_id).")
    prompt: PromptRecord = Field(description="The prompt given to the generator and the judge.")
    seed: int = Field(0, description="Generation seed of this image.")
    policy_version: int = Field(0, ge=0, description="Weight version of the sampler that generated it.")
    sampler_id: str = Field("", description="Id of the sampler actor that generated it.")
    global_score: float | None = Field(None, description="Judge's global layout score in [-1, 1]; None = none read.")
    alpha: float = Field(1.0, description="Global weight a = (g + 1) / 2 (1.0 when use_global is off).")
    mean_R: float = Field(0.0, description="Mean of the reward map R (latent resolution).")
    regions: list[Region] = Field(default_factory=list, description="The judged regions that shaped R.")
    drop_reason: DropReason | None = Field(None, description="Why it must not be trained on; None = trainable.")
    error: str | None = Field(None, description="What failed, when drop_reason is judge_failed.")
    timings: dict[str, float] = Field(default_factory=dict, description="Stage durations in seconds.")
    created_at: float = Field(default_factory=time.time, description="Unix time the record was made.")

    @field_validator("global_score", "alpha", "mean_R")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        return v

    @property
    def dropped(self) -> bool:
        return self.drop_reason is not None


@dataclass(frozen=True)
class SampleTensors:
    """The learner's tensors of one sample: ``x0`` [C, h, w] float32 (the generator's own clean latent)
    and ``R`` [h, w] float32 (the reward map on the latent grid), both on the CPU."""

    x0: torch.Tensor
    R: torch.Tensor

    def __post_init__(self) -> None:
        if self.x0.dim() != 3:
            raise ValueError(f"SampleTensors.x0 must be [C, h, w], got shape {tuple(self.x0.shape)}")
        if self.R.dim() != 2 or tuple(self.R.shape) != tuple(self.x0.shape[-2:]):
            raise ValueError(f"SampleTensors.R must be [h, w] = {tuple(self.x0.shape[-2:])}, got {tuple(self.R.shape)}")


@dataclass(frozen=True)
class TrainSample:
    """A trainable sample: its record and its tensors, by reference (a ``ray.ObjectRef`` to
    :class:`SampleTensors`; Ray passes refs nested in a dataclass without resolving them) or by value."""

    record: SampleRecord
    tensors: Any

    @property
    def sample_id(self) -> str:
        return self.record.sample_id

    @property
    def policy_version(self) -> int:
        return self.record.policy_version


@dataclass
class TrainBatch:
    """One learner batch: ``x0`` [B, C, h, w] latents, ``R`` [B, h, w] reward maps on the latent grid,
    ``alpha`` [B] global weights, one prompt per row."""

    prompts: list[str]
    x0: torch.Tensor
    R: torch.Tensor
    alpha: torch.Tensor

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if self.x0.ndim != 4 or self.x0.shape[0] != n:
            raise ValueError(f"x0 must be [B={n}, C, h, w], got {list(self.x0.shape)}")
        if self.R.ndim != 3 or self.R.shape[0] != n or tuple(self.R.shape[-2:]) != tuple(self.x0.shape[-2:]):
            raise ValueError(f"R must be [B, h, w] = {[n, *self.x0.shape[-2:]]}, got {list(self.R.shape)}")
        self.alpha = torch.as_tensor(self.alpha, dtype=torch.float32)
        if self.alpha.shape != (n,):
            raise ValueError(f"alpha must be [B={n}], got {list(self.alpha.shape)}")


def collate(samples: Sequence[TrainSample]) -> TrainBatch:
    """Stack resolved samples (tensors by value) into a :class:`TrainBatch`."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    unresolved = [s.sample_id for s in samples if not isinstance(s.tensors, SampleTensors)]
    if unresolved:
        raise TypeError(f"collate needs resolved tensors; fetch them first (e.g. {unresolved[:3]})")
    return TrainBatch(
        prompts=[s.record.prompt.text for s in samples],
        x0=torch.stack([s.tensors.x0 for s in samples]),
        R=torch.stack([s.tensors.R for s in samples]),
        alpha=torch.tensor([s.record.alpha for s in samples], dtype=torch.float32),
    )
