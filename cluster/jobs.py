"""The driver's in-flight jobs: what each pending Ray reference is waiting for, one typed record per kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.records import SampleHeader


@dataclass(frozen=True)
class SampleJob:
    """A sampler is generating a batch; the awaited ref is its header, ``batch`` the images + latents."""

    actor_id: str
    batch: Any


@dataclass(frozen=True)
class ScoreJob:
    """A scorer is judging a batch; the awaited ref is its summary, ``tensors`` one ref per image."""

    actor_id: str
    header: SampleHeader
    tensors: list[Any]


@dataclass(frozen=True)
class LearnJob:
    """The learner is training on the drawn samples ``sample_ids``."""

    sample_ids: tuple[str, ...]


@dataclass(frozen=True)
class EvalJob:
    """The learner is running the world's held-out evaluation."""


@dataclass(frozen=True)
class LearnerProbeJob:
    """Asking a restarting learner whether it is back (and where it resumed)."""


@dataclass(frozen=True)
class PushJob:
    """A sampler is loading a weight version the driver pushed (object store or Ray Direct Transport)."""

    actor_id: str
    sent_at: float


@dataclass(frozen=True)
class EndpointsJob:
    """A scorer is taking the launched judge replicas' URLs."""

    actor_id: str


Job = SampleJob | ScoreJob | LearnJob | EvalJob | LearnerProbeJob | PushJob | EndpointsJob
