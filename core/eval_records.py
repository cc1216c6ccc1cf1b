"""Evaluation records and their statistics: one :class:`EvalImageRecord` per graded image, per-category and
overall scores with 95% confidence intervals (:func:`summarize`), and the paired comparison of two models
(:func:`compare`). Plain data and numpy; the evaluators (``actors/evaluation.py``, ``srum/evaluate.py``)
produce the records, the report renders them.

Conventions. ``score`` is in [0, 1]: a VLM grade / 100, or 1/0 for a geometric check. A category's score is
the mean over its graded images; ``overall`` is the mean of the category scores (every category counts the
same, as GenEval and T2I-CompBench report), ``micro`` the mean over all graded images. Images whose grade
failed (judge error, unreadable answer) are left out of the means and counted in ``failed``. Confidence
intervals are percentile bootstraps that resample *prompts* within each category (the k images of a prompt
are not independent); a comparison resamples the prompts both models were graded on, so the interval of a
difference is paired (both models see the same prompts and seeds).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["NO_CATEGORY", "EvalImageRecord", "compare", "protocol_scores", "summarize"]

NO_CATEGORY = "all"  # the category of prompts that have none (a plain text file)
BOOTSTRAP = 2000
CONFIDENCE = 0.95

Outcome = Literal["ok", "parse_failed", "judge_error"]


class EvalImageRecord(BaseModel):
    """One evaluated image: which prompt and seed, its score in [0, 1] (None when grading failed) and why."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="label of the evaluated weights (base, a checkpoint, its EMA)")
    prompt_id: str = Field(description="the prompt's id in its file")
    prompt: str = Field(description="the prompt text")
    category: str = Field(NO_CATEGORY, description="benchmark category ('all' when the prompt has none)")
    index: int = Field(ge=0, description="image j of the prompt (0..k-1)")
    seed: int = Field(description="generation seed (the same for every model compared)")
    score: float | None = Field(None, ge=0, le=1, description="score in [0, 1]; None when grading failed")
    grade: int | None = Field(None, description="the 0-100 grade (the VLM's answer; a geometric check: 100 or 0)")
    explanation: str = Field("", description="the evaluator's reason")
    outcome: Outcome = Field("ok", description="ok / parse_failed / judge_error")
    error: str | None = Field(None, description="what went wrong when outcome is not ok")
    image: str | None = Field(None, description="path of the saved image, relative to the evaluation folder")


def _by_category(records: Iterable[EvalImageRecord]) -> dict[str, dict[str, list[float]]]:
    """{category: {prompt_id: [scores of its graded images]}} (prompts with no graded image kept as [])."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        bucket = out[r.category][r.prompt_id]
        if r.score is not None:
            bucket.append(float(r.score))
    return out


def _ci(samples: np.ndarray) -> list[float] | None:
    if samples.size == 0 or not np.isfinite(samples).any():
        return None
    lo, hi = np.nanpercentile(samples, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return [float(lo), float(hi)]


def _category_boot(prompts: dict[str, list[float]], rng: np.random.Generator) -> np.ndarray:
    """Bootstrap means of one category (resampling its prompts), shape [BOOTSTRAP]."""
    sums = np.array([sum(v) for v in prompts.values()], dtype=float)
    counts = np.array([len(v) for v in prompts.values()], dtype=float)
    if counts.sum() == 0:
        return np.full(BOOTSTRAP, np.nan)
    idx = rng.integers(0, len(sums), size=(BOOTSTRAP, len(sums)))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[idx].sum(1) / counts[idx].sum(1)


def summarize(records: Sequence[EvalImageRecord], seed: int = 0) -> dict[str, Any]:
    """``{"overall", "micro", "n", "failed", "ci", "categories": {cat: {"score", "n", "failed", "prompts", "ci"}}}``;
    scores are None where nothing was graded."""
    rng = np.random.default_rng(seed)
    cats = _by_category(records)
    failed: dict[str, int] = defaultdict(int)
    for r in records:
        failed[r.category] += r.score is None
    out_cats: dict[str, Any] = {}
    boots = []
    for cat in sorted(cats):
        prompts = cats[cat]
        values = [s for v in prompts.values() for s in v]
        boot = _category_boot(prompts, rng)
        out_cats[cat] = {"score": float(np.mean(values)) if values else None, "n": len(values),
                         "failed": failed[cat], "prompts": len(prompts), "ci": _ci(boot)}
        if values:
            boots.append(boot)
    graded = [c["score"] for c in out_cats.values() if c["score"] is not None]
    all_values = [s for p in cats.values() for v in p.values() for s in v]
    return {"overall": float(np.mean(graded)) if graded else None,
            "micro": float(np.mean(all_values)) if all_values else None,
            "n": len(all_values), "failed": int(sum(failed.values())),
            "ci": _ci(np.nanmean(np.stack(boots), 0)) if boots else None, "categories": out_cats}


def compare(a: Sequence[EvalImageRecord], b: Sequence[EvalImageRecord], seed: int = 0) -> dict[str, Any]:
    """Paired difference ``b - a`` per category and overall, with bootstrap 95% intervals over the prompts
    both were graded on: ``{"overall": {"a", "b", "delta", "ci", "prompts"}, "categories": {cat: {...}}}``."""
    rng = np.random.default_rng(seed)
    ca, cb = _by_category(a), _by_category(b)
    out: dict[str, Any] = {}
    boots_a, boots_b = [], []
    for cat in sorted(set(ca) | set(cb)):
        shared = [p for p in ca.get(cat, {}) if ca[cat][p] and cb.get(cat, {}).get(p)]
        if not shared:
            out[cat] = {"a": None, "b": None, "delta": None, "ci": None, "prompts": 0}
            continue
        sa = np.array([sum(ca[cat][p]) for p in shared]), np.array([len(ca[cat][p]) for p in shared], float)
        sb = np.array([sum(cb[cat][p]) for p in shared]), np.array([len(cb[cat][p]) for p in shared], float)
        idx = rng.integers(0, len(shared), size=(BOOTSTRAP, len(shared)))
        boot_a = sa[0][idx].sum(1) / sa[1][idx].sum(1)
        boot_b = sb[0][idx].sum(1) / sb[1][idx].sum(1)
        mean_a, mean_b = float(sa[0].sum() / sa[1].sum()), float(sb[0].sum() / sb[1].sum())
        out[cat] = {"a": mean_a, "b": mean_b, "delta": mean_b - mean_a, "ci": _ci(boot_b - boot_a),
                    "prompts": len(shared)}
        boots_a.append(boot_a)
        boots_b.append(boot_b)
    graded = [c for c in out.values() if c["delta"] is not None]
    overall: dict[str, Any] = {"a": None, "b": None, "delta": None, "ci": None,
                               "prompts": int(sum(c["prompts"] for c in graded))}
    if graded:
        overall.update(a=float(np.mean([c["a"] for c in graded])), b=float(np.mean([c["b"] for c in graded])))
        overall["delta"] = overall["b"] - overall["a"]
        overall["ci"] = _ci(np.mean(np.stack(boots_b), 0) - np.mean(np.stack(boots_a), 0))
    return {"overall": overall, "categories": out}


def protocol_scores(summary: dict[str, Any]) -> dict[str, float]:
    """A summary as the :class:`~learner.base.Evaluator` protocol's dict: ``{"overall", <category>: score,
    "n"}`` (categories with no graded image left out). Raises ``RuntimeError`` when nothing was graded."""
    if summary["overall"] is None:
        raise RuntimeError(f"evaluation graded no image ({summary['failed']} failed): is the evaluator's judge up?")
    out = {"overall": float(summary["overall"]), "n": float(summary["n"])}
    for cat, c in summary["categories"].items():
        if c["score"] is not None and cat not in ("overall", "n"):
            out[cat] = float(c["score"])
    return out
