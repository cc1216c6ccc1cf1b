"""The VLM evaluator's grading step: images + prompts -> 0-100 grades through the same judge client the
reward uses (any :class:`~rewards.judge.BaseJudge`: an OpenAI-compatible server such as vLLM, or an
in-process backend), with the evaluation prompt of :mod:`rewards.eval_prompts` (never the reward prompts).

``structured`` mode sends :func:`~rewards.eval_prompts.evaluation_json_schema` as the structured-output
schema (vLLM: ``response_format`` json_schema; in-process: the schema-directed decoder); ``text`` mode asks
for ``Score:`` / ``Explanation:`` lines. A transport failure after the judge's retries, or an answer with no
valid grade, becomes a graded-as-failed record (counted, left out of the means), never a made-up score.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rewards.eval_prompts import (
    SCORE_MAX,
    evaluation_json_schema,
    evaluation_prompt,
    parse_evaluation,
    rubric_for,
)
from rewards.judge import BaseJudge, JudgeError

__all__ = ["Grade", "VLMGrader"]


class Grade(BaseModel):
    """One image's grade: ``grade`` 0..100 (None when it failed), the explanation and the outcome."""

    model_config = ConfigDict(frozen=True)
    grade: int | None = Field(description="0..100, None when no grade was read")
    explanation: str = Field("", description="the evaluator's explanation")
    rubric: str = Field("general", description="the rubric used (the category, or 'general')")
    outcome: Literal["ok", "parse_failed", "judge_error"] = Field("ok", description="how grading went")
    error: str | None = Field(None, description="why it failed")
    raw: str = Field("", description="the raw answer")

    @property
    def score(self) -> float | None:
        """The grade in [0, 1]."""
        return None if self.grade is None else self.grade / SCORE_MAX


class VLMGrader:
    """Grades images with ``judge`` (see the module docstring); ``concurrency`` bounds requests in flight
    (the OpenAI backend also applies its per-endpoint cap)."""

    def __init__(self, judge: BaseJudge, mode: Literal["structured", "text"] = "structured", max_tokens: int = 256,
                 concurrency: int = 32):
        if mode not in ("structured", "text"):
            raise ValueError(f"grading mode must be 'structured' or 'text', got {mode!r}")
        self.judge, self.mode, self.max_tokens = judge, mode, int(max_tokens)
        self.concurrency = max(1, int(concurrency))
        self.counts = {"ok": 0, "parse_failed": 0, "judge_error": 0}

    async def grade(self, image: Any, prompt: str, category: str | None = None) -> Grade:
        """One grade; never raises for the answer or the transport (see :class:`Grade`)."""
        structured = self.mode == "structured"
        rubric = rubric_for(category)[0]
        try:
            comp = await self.judge.complete(image, evaluation_prompt(prompt, category, structured=structured),
                                             max_tokens=self.max_tokens,
                                             schema=evaluation_json_schema() if structured else None, kind="sample")
        except JudgeError as err:
            self.counts["judge_error"] += 1
            return Grade(grade=None, rubric=rubric, outcome="judge_error", error=f"{type(err).__name__}: {err}")
        answer = parse_evaluation(comp.text)
        outcome = "ok" if answer.score is not None else "parse_failed"
        self.counts[outcome] += 1
        return Grade(grade=answer.score, explanation=answer.explanation, rubric=rubric, outcome=outcome,
                     error=answer.problem, raw=comp.text[:2000])

    async def grade_many(self, images: Sequence[Any], prompts: Sequence[str],
                         categories: Sequence[str | None] | None = None) -> list[Grade]:
        """Grades of ``images`` (in order), at most ``concurrency`` requests at a time."""
        if len(images) != len(prompts) or (categories is not None and len(categories) != len(images)):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts"
                             + ("" if categories is None else f", {len(categories)} categories"))
        cats = list(categories) if categories is not None else [None] * len(images)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(i: int) -> Grade:
            async with gate:
                return await self.grade(images[i], prompts[i], cats[i])

        return list(await asyncio.gather(*[one(i) for i in range(len(images))]))
