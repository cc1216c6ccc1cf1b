"""Evaluation images and their grades: the parts the `srum eval` job and the in-run phase (``run.eval_every``)
share.

* :func:`eval_items`: the k (prompt, seed) pairs per prompt; image j of prompt i uses seed ``seed + i*k + j``,
  so every model compared sees the same noise.
* :func:`generate_images`: one policy samples them in process (in batches), with the evaluation guidance.
* :class:`EvalSamplerActor`: the same in a Ray actor (``srum eval`` runs several in parallel); it builds
  the policy from :class:`~actors.components.Components` and loads fixed weights (a checkpoint, its EMA, or
  none = the base).
* :class:`ImageEvaluator`: an :class:`~learner.base.Evaluator` over a prompt set and a *grader* (anything with
  ``async grade_many(images, prompts, categories) -> [Grade]``: the VLM grader of :mod:`rewards.evaluation`,
  or a world's own, e.g. the shapes world's geometric check); what the registry gives policy kinds whose world
  has no evaluator of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from actors.components import Components
from core.eval_records import NO_CATEGORY, EvalImageRecord, protocol_scores, summarize
from core.prompt_sets import PromptRecord
from learner.base import Policy
from rewards.evaluation import Grade

log = logging.getLogger("srum.evaluation")
T = TypeVar("T")

__all__ = ["EvalItem", "EvalSamplerActor", "Grader", "ImageEvaluator", "eval_items", "generate_images", "records_of",
           "run_coroutine"]


class Grader(Protocol):
    async def grade_many(self, images: Sequence[Any], prompts: Sequence[str],
                         categories: Sequence[str | None] | None = None) -> list[Grade]: ...


@dataclass(frozen=True)
class EvalItem:
    """Image ``index`` of ``prompt``, generated from ``seed``."""

    prompt: PromptRecord
    index: int
    seed: int


def eval_items(prompts: Sequence[PromptRecord], k: int, seed: int) -> list[EvalItem]:
    """``k`` items per prompt, prompt-major; image j of prompt i has seed ``seed + i * k + j``."""
    if k < 1:
        raise ValueError(f"images per prompt must be >= 1, got {k}")
    if not prompts:
        raise ValueError("no evaluation prompts")
    return [EvalItem(p, j, seed + i * k + j) for i, p in enumerate(prompts) for j in range(k)]


def _sample(policy: Policy, prompts: Sequence[str], seeds: Sequence[int], guidance: float | None) -> np.ndarray:
    batch = policy.sample(list(prompts), [int(s) for s in seeds], guidance=guidance)
    return batch.images.numpy()


def generate_images(policy: Policy, items: Sequence[EvalItem], batch_size: int, guidance: float | None = None,
                    progress: Callable[[int], None] | None = None) -> list[np.ndarray]:
    """Images (uint8 HxWx3) of ``items`` in order, ``batch_size`` per sampler call."""
    out: list[np.ndarray] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        out += list(_sample(policy, [c.prompt.text for c in chunk], [c.seed for c in chunk], guidance))
        if progress is not None:
            progress(len(chunk))
    return out


class EvalSamplerActor:
    """A policy with fixed weights that generates evaluation images (made remote by ``srum eval``, which
    evaluates one model after another on the same actors: :meth:`load` swaps the weights)."""

    def __init__(self, components: Components, seed: int):
        self.policy = components.policy(seed=seed)
        self.base = self.policy.trainable_state()[1]  # CPU copy: `load(None)` returns to the base

    def load(self, state: Mapping[str, Any] | None, version: int = 0) -> int:
        """Evaluate ``state`` (a checkpoint's trainable or EMA tensors) from now on; None = the base."""
        self.policy.load_trainable_state(self.base if state is None else state, version if state is not None else 0)
        return self.policy.version

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], guidance: float | None) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` images, one per (prompt, seed)."""
        return _sample(self.policy, prompts, seeds, guidance)

    def ping(self) -> int:
        return self.policy.version


def records_of(model: str, items: Sequence[EvalItem], grades: Sequence[Grade],
               images: Sequence[str | None] | None = None) -> list[EvalImageRecord]:
    """One :class:`EvalImageRecord` per (item, grade); ``images`` are their saved paths when kept."""
    paths = list(images) if images is not None else [None] * len(items)
    return [EvalImageRecord(model=model, prompt_id=it.prompt.id, prompt=it.prompt.text,
                            category=it.prompt.category or NO_CATEGORY, index=it.index, seed=it.seed,
                            score=g.score, grade=g.grade, explanation=g.explanation, outcome=g.outcome,
                            error=g.error, image=path)
            for it, g, path in zip(items, grades, paths, strict=True)]


def run_coroutine(factory: Callable[[], Awaitable[T]]) -> T:
    """Run ``factory()`` to completion from sync code, also when this thread already runs an event loop (the
    in-process loop of :mod:`srum.local` calls evaluators from inside one): then in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())  # type: ignore[arg-type]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()  # type: ignore[arg-type]


class ImageEvaluator:
    """:class:`~learner.base.Evaluator`: ``k`` images per prompt from the policy being trained, graded by the
    grader ``make_grader()`` builds (one per evaluation, so a client is bound to that evaluation's event loop).
    ``prepare(grader)`` is awaited first (e.g. the judge's health check). ``last_records`` keeps the records
    of the latest evaluation."""

    def __init__(self, prompts: Sequence[PromptRecord], make_grader: Callable[[], Grader], *, k: int = 2,
                 seed: int = 10_000, batch_size: int = 8, guidance: float | None = None, label: str = "current",
                 prepare: Callable[[Grader], Awaitable[None]] | None = None,
                 close: Callable[[Grader], Awaitable[None]] | None = None):
        self.items = eval_items(prompts, k, seed)
        self.make_grader, self.prepare, self.close = make_grader, prepare, close
        self.batch_size, self.guidance, self.label = batch_size, guidance, label
        self.last_records: list[EvalImageRecord] = []

    def evaluate(self, policy: Policy) -> dict[str, float]:
        images = generate_images(policy, self.items, self.batch_size, self.guidance)

        async def grade() -> list[Grade]:
            grader = self.make_grader()
            try:
                if self.prepare is not None:
                    await self.prepare(grader)
                return await grader.grade_many(images, [it.prompt.text for it in self.items],
                                               [it.prompt.category for it in self.items])
            finally:
                if self.close is not None:
                    await self.close(grader)

        grades = run_coroutine(grade)
        self.last_records = records_of(self.label, self.items, grades)
        summary = summarize(self.last_records)
        if summary["failed"]:
            log.warning("evaluation: %d of %d images could not be graded (%s)", summary["failed"],
                        len(self.items), sorted({g.error or g.outcome for g in grades if g.grade is None})[:3])
        return protocol_scores(summary)
