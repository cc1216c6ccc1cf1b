"""Records that cross actor boundaries in the online service.

A scored sample travels as two parts:

- :class:`SampleMeta` — small, typed metadata (prompt, seed, policy version, scores, timings). It is
  copied freely: into the replay buffer actor, into ``metrics.jsonl`` and into the gallery.
- the tensors the learner needs (:class:`TrainSample`: the x0 latent, the reward map R at latent
  resolution, alpha), put ONCE into Ray's object store by the scorer. Only the ``ObjectRef`` moves.

:class:`BufferEntry` pairs the two. Ray resolves ``ObjectRef`` s only when they are *top-level*
arguments of a remote call; refs nested inside a list or a dataclass are passed by reference, so a
``list[BufferEntry]`` given to the buffer actor never copies tensors through it.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch
    from ray import ObjectRef

__all__ = [
    "SampleMeta",
    "TrainSample",
    "BufferEntry",
    "new_sample_id",
    "make_entry",
    "train_sample_nbytes",
]


def new_sample_id(sampler_id: str | int = "s", policy_version: int = 0) -> str:
    """A unique, readable sample id: ``<sampler>-v<version>-<12 hex>``."""
    return f"{sampler_id}-v{policy_version}-{uuid.uuid4().hex[:12]}"


class SampleMeta(BaseModel):
    """Metadata of one generated-and-scored sample (no tensors)."""

    model_config = ConfigDict(extra="forbid")

    sample_id: str = Field(..., min_length=1, description="Unique id of the sample (see new_sample_id).")
    prompt_id: str = Field("", description="Id of the prompt record the sample was generated from.")
    prompt: str = Field("", description="Prompt text given to the generator and the judge.")
    category: str | None = Field(None, description="Prompt category (benchmark sub-set), if known.")
    seed: int = Field(0, description="Generation seed of this image.")
    policy_version: int = Field(0, ge=0, description="Weight version of the sampler that generated it.")
    sampler_id: str = Field("", description="Id of the sampler actor that generated it.")
    global_score: float | None = Field(None, description="Judge's global layout score in [-1, 1]; None = failed.")
    alpha: float = Field(1.0, description="Global weight a = (g + 1) / 2 (1.0 when use_global is off).")
    mean_R: float = Field(0.0, description="Mean of the reward map R (latent resolution).")
    n_regions: int = Field(0, ge=0, description="Number of scored regions that shaped R.")
    regions: list[dict[str, Any]] = Field(
        default_factory=list, description="Regions as dicts: box [x1,y1,x2,y2] px, label, score, reason."
    )
    drop: bool = Field(False, description="True when the sample must not be trained on.")
    drop_reason: str | None = Field(None, description="Why it is dropped (e.g. judge_failed, zero_global).")
    timings: dict[str, float] = Field(default_factory=dict, description="Stage durations in seconds.")
    created_at: float = Field(default_factory=time.time, description="Unix time the record was made.")

    @field_validator("global_score", "alpha", "mean_R")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError(f"must be a finite number, got {v!r}")
        return v


@dataclass
class TrainSample:
    """What the learner needs of one sample; put into the object store by the scorer.

    ``x0``: the generator's own clean latent [C, h, w] float32 (CPU). ``R``: reward map at latent
    resolution [h, w] float32. ``alpha``: global weight. The prompt is repeated here so the learner
    never needs the metadata to train.
    """

    x0: torch.Tensor
    R: torch.Tensor
    alpha: float
    prompt: str
    sample_id: str = ""
    policy_version: int = 0

    def __post_init__(self) -> None:
        if self.x0.dim() != 3:
            raise ValueError(f"TrainSample.x0 must be [C, h, w], got shape {tuple(self.x0.shape)}")
        if self.R.dim() != 2:
            raise ValueError(f"TrainSample.R must be [h, w], got shape {tuple(self.R.shape)}")
        if tuple(self.R.shape) != tuple(self.x0.shape[-2:]):
            raise ValueError(
                f"TrainSample.R {tuple(self.R.shape)} must match the latent grid {tuple(self.x0.shape[-2:])}"
            )


def train_sample_nbytes(sample: TrainSample) -> int:
    """Bytes of the tensors in a :class:`TrainSample`."""
    return sum(t.numel() * t.element_size() for t in (sample.x0, sample.R))


@dataclass(frozen=True)
class BufferEntry:
    """One replay-buffer entry: metadata by value, tensors by object reference.

    ``ref`` is normally a ``ray.ObjectRef`` to a :class:`TrainSample`. The plain (non-Ray) path may
    hold the :class:`TrainSample` itself; :class:`~cluster.buffer.ReplayBuffer` rejects that unless
    it was built with ``require_refs=False``.
    """

    meta: SampleMeta
    ref: ObjectRef | Any = field(repr=False)

    @property
    def sample_id(self) -> str:
        return self.meta.sample_id

    @property
    def policy_version(self) -> int:
        return self.meta.policy_version


def make_entry(meta: SampleMeta, sample: TrainSample, *, use_ray: bool | None = None) -> BufferEntry:
    """Put ``sample`` into the object store (once) and pair its ref with ``meta``.

    ``use_ray=None`` uses Ray when it is initialised; without Ray the sample itself is stored (the
    in-process path).

    Ownership: the process that calls this (normally a scorer) OWNS the object. Ray frees it when
    no ref is left, and loses it when the owner dies: a scorer that is killed or scaled down takes
    its un-trained buffer entries with it (``ray.get`` then raises ``OwnerDiedError``; see
    :func:`cluster.buffer.resolve_entries`, which separates such entries out). To outlive scorers,
    make the driver the owner instead: return the :class:`TrainSample` from the scorer method (a
    ``num_returns="streaming"`` generator gives one driver-owned ref per sample).
    """
    import ray

    if use_ray is None:
        use_ray = ray.is_initialized()
    if meta.sample_id != sample.sample_id and sample.sample_id:
        raise ValueError(f"sample id mismatch: meta {meta.sample_id!r} vs tensors {sample.sample_id!r}")
    ref = ray.put(sample) if use_ray else sample
    return BufferEntry(meta=meta, ref=ref)
