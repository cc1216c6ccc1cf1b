"""Scorer actor: the understanding module as judge, per sample: regions -> judge -> reward map.

A plain class with async methods (the driver makes it a remote async actor, so several batches are
judged concurrently). `score_batch` returns `1 + batch_size` values (the driver calls it with
`num_returns=1 + batch_size`): a small summary, then one training record per image (None for a dropped
or failed sample). Returning the records, instead of `ray.put`-ing them here, makes the driver their
owner: a scorer that dies later never takes buffered samples with it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from PIL import Image

from cluster import metrics as M
from cluster.config import SRUMConfig
from cluster.records import SampleMeta, new_sample_id
from rewards.judge import make_judge
from rewards.regions import make_proposer
from rewards.scorer import SampleScorer

log = logging.getLogger("srum.scorer")


class ScorerActor:
    def __init__(self, cfg: SRUMConfig, scorer_id: str):
        self.cfg = cfg
        self.scorer_id = scorer_id
        self.judge = make_judge(cfg.judge)
        self.proposer = make_proposer(cfg.regions, judge=self.judge)
        self.scorer = SampleScorer(self.judge, self.proposer, cfg.reward)
        self.metrics = M.Metrics()
        self.counts = {"batches": 0, "scored": 0, "dropped": 0, "failed": 0}
        self.judge.add_listener(self._on_judge_request)

    async def start(self) -> str:
        """Health-check the judge (fails fast with a message naming the URL when a server is down)."""
        check = getattr(self.judge, "check_health", None)
        if check is not None:
            result = check()
            if hasattr(result, "__await__"):
                await result
        return self.scorer_id

    async def score_batch(self, sampled: dict[str, Any]) -> tuple:
        batch = sampled["batch"]
        prompts = sampled["prompts"]
        latent_hw = tuple(batch.x0.shape[-2:])
        images = [Image.fromarray(np.asarray(img, dtype=np.uint8)) for img in batch.images.numpy()]
        t0 = time.perf_counter()
        scored = await self.scorer.score_many(images, [p.text for p in prompts], latent_hw)
        seconds = time.perf_counter() - t0
        records: list[dict[str, Any] | None] = []
        metas: list[dict[str, Any]] = []
        for i, (prompt, result) in enumerate(zip(prompts, scored, strict=True)):
            meta = SampleMeta(
                sample_id=new_sample_id(sampled["sampler_id"], sampled["policy_version"]),
                prompt_id=prompt.id,
                prompt=prompt.text,
                category=prompt.category,
                seed=int(batch.seeds[i]),
                policy_version=int(sampled["policy_version"]),
                sampler_id=sampled["sampler_id"],
                global_score=result.global_score,
                alpha=float(result.alpha),
                mean_R=float(result.R_latent.mean()) if result.R_latent is not None else 0.0,
                n_regions=len(result.regions),
                regions=[_region_dict(r) for r in result.regions],
                drop=bool(result.drop or result.failed),
                drop_reason=("judge_failed" if result.failed else result.drop_reason) if (result.drop or result.failed) else None,
                timings={"sample_s": sampled["sample_seconds"] / max(1, len(prompts)), **dict(result.timings)},
                created_at=time.time(),
            )
            metas.append(meta.model_dump())
            if meta.drop:
                records.append(None)
                self.counts["failed" if result.failed else "dropped"] += 1
                continue
            records.append({"meta": meta, "x0": batch.x0[i].float().cpu(), "R": result.R_latent.float().cpu(),
                            "alpha": float(result.alpha)})
            self.counts["scored"] += 1
        self.counts["batches"] += 1
        self._record_metrics(metas)
        first = scored[0] if scored else None
        summary = {
            "scorer_id": self.scorer_id,
            "metas": metas,
            "score_seconds": seconds,
            "judge": self.judge.counters(),
            # one sample per batch for the gallery: what the judge saw and the reward map it produced
            "preview": None if first is None else {
                "image": batch.images[0].numpy(),
                "meta": metas[0],
                "R": None if first.reward_map is None else first.reward_map.R.numpy(),
            },
        }
        return (summary, *records)

    def _on_judge_request(self, outcome: str, latency_s: float) -> None:
        """Per judge request: count it by outcome (and parse failures) and record its latency."""
        tags = {"kind": "judge"}
        self.metrics.inc(M.JUDGE_REQUESTS, 1, {"outcome": outcome, **tags})
        if outcome == "parse_failed":
            self.metrics.inc(M.PARSE_FAILURES, 1, tags)
        self.metrics.observe(M.JUDGE_LATENCY_SECONDS, latency_s, tags)

    def _record_metrics(self, metas: list[dict[str, Any]]) -> None:
        tags = {"actor": self.scorer_id}
        self.metrics.inc(M.SAMPLES_SCORED, len(metas), tags)
        scores = [m["global_score"] for m in metas if m["global_score"] is not None]
        if scores:
            self.metrics.set(M.REWARD_GLOBAL_SCORE, sum(scores) / len(scores), tags)
        if metas:
            self.metrics.set(M.REWARD_ALPHA, sum(m["alpha"] for m in metas) / len(metas), tags)
            self.metrics.set(M.REWARD_MEAN_R, sum(m["mean_R"] for m in metas) / len(metas), tags)

    def get_metrics(self) -> dict[str, Any]:
        return {"actor": self.scorer_id, **self.counts, "judge": self.judge.counters()}

    def ping(self) -> str:
        return self.scorer_id

    async def stop(self) -> dict[str, Any]:
        close = getattr(self.judge, "aclose", None)
        if close is not None:
            await close()
        return self.get_metrics()


def _region_dict(region: Any) -> dict[str, Any]:
    if hasattr(region, "model_dump"):
        return region.model_dump()
    return dict(region)
