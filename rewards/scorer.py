"""Per-sample scoring: image + prompt -> regions, judge scores, reward map (image and latent grid).

:class:`SampleScorer` glues a region proposer (:mod:`rewards.regions`), a judge
(:mod:`rewards.judge`) and the reward map (:mod:`rewards.reward_map`):

* ``reward.granularity == "region"``: the proposer's boxes (SAM / grounding) are judged in one
  hybrid request while the global-layout score is requested concurrently (and the proposer runs
  concurrently with the global request); the regions' "Identified Object" answers go through the
  keyword filter when ``regions.keyword_filter`` is on; then
  :func:`rewards.reward_map.build_reward_map` at image resolution and
  :func:`rewards.reward_map.resize_map` to the latent grid.
* ``reward.granularity == "sample"``: one sample-level score (and the global score when
  ``reward.use_global``); no regions are proposed.
* ``reward.use_global == False``: the global score is not requested at all.

Failures: any exception while scoring a sample (a judge call that failed after its retries, a
proposer error) gives a :class:`ScoredSample` with ``drop_reason=DropReason.JUDGE_FAILED`` (``failed``)
and the error text; it is logged and counted, never raised.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from core.config import RewardConfig
from core.records import DropReason, Region
from rewards.judge import BaseJudge, JudgeError, JudgeResult, RegionsJudgeResult, prepare_image
from rewards.regions import Proposal, RegionProposer, keyword_filter
from rewards.reward_map import RewardMap, build_reward_map, resize_map

log = logging.getLogger("srum.scorer")


@dataclass
class ScoredSample:
    """Everything the scorer learned about one sample."""

    prompt: str
    regions: list[Region] = field(default_factory=list)
    global_score: float | None = None
    global_reason: str = ""
    sample_score: float | None = None
    alpha: float = 0.0
    reward_map: RewardMap | None = None
    R_latent: torch.Tensor | None = None
    drop_reason: DropReason | None = None
    error: str | None = None
    ambiguous: bool = False
    n_proposed: int = 0
    n_filtered: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def drop(self) -> bool:
        """Not to be trained on (judge failure, or the reward map's own drop rule)."""
        return self.drop_reason is not None

    @property
    def failed(self) -> bool:
        """The judge or the proposer failed for this sample."""
        return self.drop_reason == DropReason.JUDGE_FAILED


class SampleScorer:
    """Score samples with ``judge`` and ``proposer`` under ``reward_cfg``; ``keyword_filter`` keeps only
    regions whose identified object matches a prompt word (``regions.keyword_filter``);
    ``max_concurrency`` bounds :meth:`score_many`. A score the judge read only with a doubt (outcome
    ``ambiguous``) is handled by ``on_ambiguous`` (``judge.on_ambiguous``): ``drop`` the sample
    (:attr:`DropReason.JUDGE_AMBIGUOUS`; its map is still built for the gallery), ``neutral`` (the score
    becomes 0) or ``use`` (the parser's best reading).
    """

    def __init__(self, judge: BaseJudge, proposer: RegionProposer, reward_cfg: RewardConfig,
                 keyword_filter: bool = False, max_concurrency: int = 8,
                 on_ambiguous: Literal["drop", "neutral", "use"] = "drop"):
        self.judge = judge
        self.proposer = proposer
        self.cfg = reward_cfg
        self.keyword_filter = keyword_filter
        self.on_ambiguous = on_ambiguous
        self.max_concurrency = max(1, int(max_concurrency))
        self.counts: dict[str, int] = {"scored": 0, "failed": 0, "dropped": 0, "ambiguous": 0,
                                       "regions_proposed": 0, "regions_filtered": 0}
        self.errors: dict[str, int] = {}

    async def score(self, image: Any, prompt: str, latent_hw: Sequence[int]) -> ScoredSample:
        """Score one image (PIL, uint8 HxWx3 array or tensor) for ``prompt``; never raises."""
        t0 = time.perf_counter()
        out = ScoredSample(prompt=prompt)
        try:
            img = prepare_image(image)
            width, height = img.size
            s_res: JudgeResult | None = None
            r_res: RegionsJudgeResult | None = None
            props: list[Proposal] = []
            if self.cfg.granularity == "sample":
                g_res, s_res = await _all(self._global(img, prompt), self.judge.score_sample(img, prompt))
            else:
                g_res, (props, r_res, propose_s) = await _all(self._global(img, prompt), self._regions(img, prompt))
                out.timings["propose_s"] = propose_s
            out.ambiguous = any(r is not None and r.outcome == "ambiguous"
                                for r in (g_res, s_res, *(r_res.regions if r_res else ())))
            if out.ambiguous and self.on_ambiguous == "neutral":
                g_res, s_res, r_res = _neutral(g_res), _neutral(s_res), _neutral_regions(r_res)
            regions: list[Region] = []
            if s_res is not None:
                out.sample_score = s_res.score
            else:
                regions = _merge(props, r_res)
                out.n_proposed = len(props)
                regions, out.n_filtered = keyword_filter(regions, prompt, self.keyword_filter)
            out.timings["judge_s"] = time.perf_counter() - t0
            if g_res is not None:
                out.global_score, out.global_reason = g_res.score, g_res.reason
            t1 = time.perf_counter()
            rmap = build_reward_map(regions, out.global_score, height, width, self.cfg, sample_score=out.sample_score)
            h, w = int(latent_hw[0]), int(latent_hw[1])
            out.R_latent = resize_map(rmap.R, h, w, mode=self.cfg.resize)
            out.timings["map_s"] = time.perf_counter() - t1
            out.regions, out.reward_map = regions, rmap
            out.alpha, out.drop_reason = rmap.alpha, rmap.drop_reason
            if out.ambiguous and self.on_ambiguous == "drop" and out.drop_reason is None:
                out.drop_reason = DropReason.JUDGE_AMBIGUOUS
        except Exception as err:  # contract: a failed sample, never an exception
            kind = err.kind if isinstance(err, JudgeError) else type(err).__name__
            self.errors[kind] = self.errors.get(kind, 0) + 1
            if isinstance(err, JudgeError):
                log.warning("scoring failed for prompt %r: %s", prompt[:80], err)
            else:
                log.exception("scoring failed for prompt %r", prompt[:80])
            out = ScoredSample(prompt=prompt, error=f"{type(err).__name__}: {err}",
                               drop_reason=DropReason.JUDGE_FAILED, timings=out.timings)
        out.timings["total_s"] = time.perf_counter() - t0
        self._count(out)
        return out

    async def score_many(self, images: Sequence[Any], prompts: Sequence[str], latent_hw: Sequence[int],
                         max_concurrency: int | None = None) -> list[ScoredSample]:
        """Score ``images[i]`` for ``prompts[i]`` with at most ``max_concurrency`` at once (order kept)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        sem = asyncio.Semaphore(max_concurrency or self.max_concurrency)

        async def one(image: Any, prompt: str) -> ScoredSample:
            async with sem:
                return await self.score(image, prompt, latent_hw)

        return list(await asyncio.gather(*(one(i, p) for i, p in zip(images, prompts, strict=True))))

    def counters(self) -> dict[str, Any]:
        return {**self.counts, "errors": dict(self.errors)}

    # internals -------------------------------------------------------------------------------
    async def _global(self, img: Any, prompt: str) -> JudgeResult | None:
        return await self.judge.score_global(img, prompt) if self.cfg.use_global else None

    async def _regions(self, img: Any, prompt: str) -> tuple[list[Proposal], RegionsJudgeResult | None, float]:
        t0 = time.perf_counter()
        props = await self.proposer.apropose(img, prompt)
        propose_s = time.perf_counter() - t0
        if not props:
            return props, None, propose_s
        return props, await self.judge.score_regions(img, prompt, [p.box for p in props]), propose_s

    def _count(self, out: ScoredSample) -> None:
        c = self.counts
        c["failed" if out.failed else ("dropped" if out.drop else "scored")] += 1
        c["ambiguous"] += out.ambiguous
        c["regions_proposed"] += out.n_proposed
        c["regions_filtered"] += out.n_filtered


async def _all(*coros: Any) -> list[Any]:
    """``asyncio.gather`` that cancels (and awaits) the siblings when one fails."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _neutral(res: JudgeResult | None) -> JudgeResult | None:
    """An ambiguous score as the neutral 0 (``judge.on_ambiguous: neutral``)."""
    return res.model_copy(update={"score": 0.0}) if res is not None and res.outcome == "ambiguous" else res


def _neutral_regions(res: RegionsJudgeResult | None) -> RegionsJudgeResult | None:
    return None if res is None else res.model_copy(update={"regions": tuple(_neutral(r) for r in res.regions)})


def _merge(props: Sequence[Proposal], res: RegionsJudgeResult | None) -> list[Region]:
    if res is None:
        return []
    return [Region(box=p.box, score=r.score, label=r.label or p.label, reason=r.reason)
            for p, r in zip(props, res.regions, strict=True)]
