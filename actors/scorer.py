"""Scorer actor: the understanding module as judge, per sample: regions -> judge -> reward map.

A plain class with async methods (the driver makes it a remote async actor, so several batches are
judged concurrently). :meth:`ScorerActor.score` takes a generated batch (the header by value, the
images and latents resolved from the object store) and returns ``1 + n`` values (the driver calls it
with ``num_returns=1 + n``): a :class:`ScoreSummary` (one :class:`~core.records.SampleRecord` per image,
a gallery preview, the judge's counters), then one :class:`~core.records.SampleTensors` per image (None
for a dropped sample). Returning the tensors, instead of ``ray.put``-ing them here, makes the driver
their owner: a scorer that dies later never takes buffered samples with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.components import Components
from actors.rollout import Preview, score
from core.metrics import Metric, Metrics
from core.records import SampleHeader, SampleRecord
from learner.base import SampleBatch
from rewards.judge import RequestKind


@dataclass
class ScoreSummary:
    """The by-value part of a scored batch."""

    records: list[SampleRecord]
    preview: Preview | None
    judge: dict[str, Any]
    seconds: float


class ScorerActor:
    def __init__(self, components: Components, scorer_id: str):
        self.scorer_id = scorer_id
        self.judge = components.judge()
        self.scorer = components.scorer(self.judge)
        self.metrics = Metrics({"actor": scorer_id})
        self.judge.add_listener(self._on_judge_request)

    async def start(self) -> str:
        """Health-check the judge (fails fast with a message naming the URL when a server is down)."""
        await self.judge.check_health()
        return self.scorer_id

    async def set_judge_endpoints(self, urls: list[str]) -> int:
        """Follow the run's launched judge replicas (the driver calls it when their URLs change)."""
        set_endpoints = getattr(self.judge, "set_endpoints", None)
        if set_endpoints is None:
            raise TypeError(f"the {type(self.judge).__name__} judge has no endpoints to set")
        set_endpoints(urls)
        return len(urls)

    async def score(self, header: SampleHeader, batch: SampleBatch) -> tuple:
        """Judge one generated batch: ``(ScoreSummary, *tensors)`` (call with ``num_returns=1 + header.n``)."""
        scored = await score(self.scorer, header, batch)
        records = [s.record for s in scored.samples]
        self._record_metrics(records)
        summary = ScoreSummary(records, scored.preview, self.judge.counters(), scored.seconds)
        return (summary, *(s.tensors for s in scored.samples))

    def _on_judge_request(self, kind: RequestKind, outcome: str, latency_s: float) -> None:
        """Per judge request: count it by outcome and kind (and parse failures), record its latency."""
        self.metrics.inc(Metric.JUDGE_REQUESTS, 1, outcome=outcome, kind=kind)
        if outcome == "parse_failed":
            self.metrics.inc(Metric.PARSE_FAILURES, 1, kind=kind)
        self.metrics.observe(Metric.JUDGE_LATENCY, latency_s, kind=kind)

    def _record_metrics(self, records: list[SampleRecord]) -> None:
        m = self.metrics
        m.inc(Metric.SAMPLES_SCORED, len(records))
        for r in records:
            m.observe(Metric.SCORER_SAMPLE_TIME, r.timings.get("total_s", 0.0))
        scores = [r.global_score for r in records if r.global_score is not None]
        if scores:
            m.set(Metric.REWARD_GLOBAL_SCORE, sum(scores) / len(scores))
        if records:
            m.set(Metric.REWARD_ALPHA, sum(r.alpha for r in records) / len(records))
            m.set(Metric.REWARD_MEAN_R, sum(r.mean_R for r in records) / len(records))

    def get_metrics(self) -> dict[str, Any]:
        """Identity, the judge's counters and the metrics snapshot."""
        return {"actor": self.scorer_id, "judge": self.judge.counters(), **self.metrics.snapshot()}

    def ping(self) -> str:
        return self.scorer_id

    async def stop(self) -> dict[str, Any]:
        await self.judge.aclose()
        return self.get_metrics()
