"""The shapes world's grader for `srum eval`: the exact geometric check of :mod:`shapes.evaluator` (nothing
learned, independent of the reward) behind the grader interface the evaluation job uses
(``async grade_many(images, prompts, categories) -> [Grade]``): grade 100 when the image satisfies the
prompt's spec (counts of every mentioned shape and colour, and the relation), 0 when not, with what was
found as the explanation. A prompt outside the world's grammar is a failed grade naming the prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rewards.evaluation import Grade
from shapes.evaluator import check
from shapes.world import parse_prompt

__all__ = ["GeometricGrader"]


def _explain(result: dict[str, Any]) -> str:
    counts = ", ".join(f"{name} {found}/{want}" for name, (found, want) in result["counts"].items())
    rel = result["relation_ok"]
    relation = "" if rel is None else f"; relation {'holds' if rel else 'does not hold'}"
    return f"{'correct' if result['correct'] else 'wrong'}: found {counts}{relation}"


class GeometricGrader:
    """Grades shapes-world images by :func:`shapes.evaluator.check` (see the module docstring)."""

    async def grade_many(self, images: Sequence[Any], prompts: Sequence[str],
                         categories: Sequence[str | None] | None = None) -> list[Grade]:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        out = []
        for image, prompt in zip(images, prompts, strict=True):
            try:
                spec = parse_prompt(prompt)
            except ValueError as exc:
                out.append(Grade(grade=None, outcome="parse_failed", error=str(exc), rubric="geometric"))
                continue
            result = check(np.asarray(image), spec)
            out.append(Grade(grade=100 if result["correct"] else 0, explanation=_explain(result),
                             rubric="geometric"))
        return out
