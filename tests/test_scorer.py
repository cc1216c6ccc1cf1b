"""SampleScorer end to end: generated image -> regions -> judge -> reward maps, each backend and mode."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from core.config import (
    NoRegionsConfig,
    OpenAIJudgeConfig,
    RewardConfig,
    SamRegionsConfig,
    TransformersJudgeConfig,
)
from core.records import DropReason
from rewards.judge import JudgeResult, RegionsJudgeResult
from rewards.judge_hf import TransformersJudge
from rewards.regions import NoneProposer, Proposal, RegionProposer
from rewards.scorer import SampleScorer
from rewards.tiny_vlm import build_tiny_vlm
from srum.registry import make_judge, make_proposer
from tests.judge_fake_server import FakeOpenAIServer, scene

LATENT = (8, 8)


class FixedProposer(RegionProposer):
    def __init__(self, boxes, cfg=None):
        super().__init__(cfg or SamRegionsConfig())
        self.boxes = boxes

    async def apropose(self, image, prompt):
        return [Proposal(box=b, area=(b[2] - b[0]) * (b[3] - b[1])) for b in self.boxes]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_vlm("qwen2_5_vl", seed=0)


@pytest.fixture
def server():
    srv = FakeOpenAIServer().start()
    yield srv
    srv.close()


def check_consistent(res, prompt="p"):
    assert not res.failed and res.error is None and res.prompt == prompt
    assert res.reward_map is not None and tuple(res.reward_map.R.shape) == (64, 64)
    assert tuple(res.R_latent.shape) == LATENT and res.R_latent.dtype == torch.float32
    g = res.global_score
    assert res.drop == (g is None or g == 0.0)
    if g is not None:
        assert res.alpha == pytest.approx((g + 1) / 2)
    assert set(res.timings) >= {"judge_s", "map_s", "total_s"}


@pytest.mark.parametrize("mode", ["text", "structured", "logprob"])
def test_transformers_backend_end_to_end(tiny, mode):
    model, processor = tiny
    judge = TransformersJudge(TransformersJudgeConfig(mode=mode, max_tokens=16), model, processor)
    scorer = SampleScorer(judge, make_proposer(SamRegionsConfig(points_per_side=4)), RewardConfig())
    res = asyncio.run(scorer.score(scene(), "a red ball left of a blue box", LATENT))
    check_consistent(res, "a red ball left of a blue box")
    assert res.n_proposed == len(res.regions) >= 1 and "propose_s" in res.timings
    if mode != "text":  # a random judge still scores in these modes
        assert res.global_score is not None and all(r.score is not None for r in res.regions)
        assert not res.drop or res.global_score == 0.0


@pytest.mark.parametrize("mode", ["text", "structured", "logprob"])
def test_openai_backend_end_to_end(server, mode):
    def answer(body):
        text = body["messages"][0]["content"][1]["text"]
        if "Region ID: 2" in text:
            if mode == "structured":
                return ('{"regions":[{"id":1,"object":"red ball","score":8,"reason":"good"},'
                        '{"id":2,"object":"blue box","score":-5,"reason":"warped"}]}')
            return ("Region ID: 1\nIdentified Object: red ball\nScore: 0.8\nReason: good\n---\n"
                    "Region ID: 2\nIdentified Object: blue box\nScore: -0.5\nReason: warped\n---")
        return '{"score":6,"reason":"ok"}' if mode == "structured" else "Score: 0.6\nReason: ok"

    server.answer = answer
    server.probe = lambda body: {"0": 1.0} if body["messages"][-1]["content"].endswith("Score: ") else {"6": 1.0}
    judge = make_judge(OpenAIJudgeConfig(mode=mode, endpoints=[server.base_url]))
    boxes = [(4, 6, 31, 35), (34, 30, 61, 61)]
    scorer = SampleScorer(judge, FixedProposer(boxes), RewardConfig())

    async def go():
        try:
            return await scorer.score(np.asarray(scene()), "a red ball left of a blue box", LATENT)
        finally:
            await judge.aclose()

    res = asyncio.run(go())
    check_consistent(res, "a red ball left of a blue box")
    assert res.global_score == pytest.approx(0.6) and res.alpha == pytest.approx(0.8)
    expected = [0.8, -0.5] if mode != "logprob" else [0.6, 0.6]
    assert [r.score for r in res.regions] == [pytest.approx(v) for v in expected]
    assert [r.box for r in res.regions] == [tuple(float(v) for v in b) for b in boxes]
    R = res.reward_map.R  # official: background 0.5, box (s + 1) / 2 merged with max
    assert R[10, 10].item() == pytest.approx((expected[0] + 1) / 2)
    assert R[40, 40].item() == pytest.approx(max(0.5, (expected[1] + 1) / 2))
    assert R[0, 63].item() == pytest.approx(0.5)
    assert res.R_latent.mean().item() == pytest.approx(R.mean().item(), abs=1e-6)  # area resize keeps the mean


def test_judge_failure_gives_counted_failed_sample(server):
    server.script = [500] * 100
    judge = make_judge(OpenAIJudgeConfig(mode="text", endpoints=[server.base_url], max_retries=1,
                                   backoff_s=0.01))
    scorer = SampleScorer(judge, FixedProposer([(0, 0, 32, 32)]), RewardConfig())

    async def go():
        try:
            failed = await scorer.score(scene(), "a", LATENT)
            server.script.clear()  # the server recovers
            ok = await scorer.score_many([scene(), scene()], ["b", "c"], LATENT)
            return failed, ok
        finally:
            await judge.aclose()

    first, ok = asyncio.run(go())
    assert first.failed and first.drop and first.drop_reason == DropReason.JUDGE_FAILED
    assert "HTTP 500" in first.error and first.R_latent is None and first.reward_map is None
    assert all(not r.failed and r.global_score == pytest.approx(0.5) for r in ok)
    assert scorer.counters()["failed"] == 1 and scorer.counters()["errors"] == {"http_error": 1}
    assert judge.counters()["http_error"] >= 1 and judge.counters()["ok"] == 4


def test_proposer_crash_is_a_failed_sample():
    class Broken(RegionProposer):
        async def apropose(self, image, prompt):
            raise RuntimeError("boom")

    scorer = SampleScorer(StubJudge(), Broken(SamRegionsConfig()), RewardConfig())
    res = asyncio.run(scorer.score(scene(), "p", LATENT))
    assert res.failed and res.error == "RuntimeError: boom" and scorer.counters()["errors"] == {"RuntimeError": 1}


class StubJudge:
    """Scores by rule; counts calls and peak concurrency."""

    mode = "text"

    def __init__(self, g=0.4, s=-0.2, region=0.6, labels=("ball", "cloud"), doubtful=()):
        self.g, self.s, self.region, self.labels = g, s, region, labels
        self.doubtful = set(doubtful)  # which answers come back "ambiguous": global, sample, regions
        self.calls: list[str] = []
        self.active = self.peak = 0

    async def _enter(self, what):
        self.calls.append(what)
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.01)
        self.active -= 1

    async def score_global(self, image, prompt):
        await self._enter("global")
        return _R(self.g, outcome="ambiguous" if "global" in self.doubtful else "ok")

    async def score_sample(self, image, prompt):
        await self._enter("sample")
        return _R(self.s, outcome="ambiguous" if "sample" in self.doubtful else "ok")

    async def score_regions(self, image, prompt, boxes):
        await self._enter("regions")
        outcome = "ambiguous" if "regions" in self.doubtful else "ok"
        return _RR([_R(self.region, label=self.labels[i % len(self.labels)], outcome=outcome if i == 0 else "ok")
                    for i in range(len(boxes))])


def _R(score, label=None, reason="r", outcome="ok"):
    return JudgeResult(score=score, label=label, reason=reason, outcome=outcome)


def _RR(regions):
    return RegionsJudgeResult(regions=tuple(regions))


def test_sample_granularity_uses_sample_prompt():
    judge = StubJudge()
    scorer = SampleScorer(judge, FixedProposer([(0, 0, 8, 8)]), RewardConfig(granularity="sample"))
    res = asyncio.run(scorer.score(scene(), "p", LATENT))
    assert sorted(judge.calls) == ["global", "sample"] and res.regions == []
    assert torch.allclose(res.R_latent, torch.full(LATENT, (-0.2 + 1) / 2))
    assert res.sample_score == -0.2 and res.alpha == pytest.approx(0.7)


def test_no_global_and_keyword_filter():
    judge = StubJudge()
    scorer = SampleScorer(judge, FixedProposer([(0, 0, 32, 32), (32, 32, 64, 64)]),
                          RewardConfig(use_global=False), keyword_filter=True)
    res = asyncio.run(scorer.score(scene(), "a red ball on grass", LATENT))
    assert judge.calls == ["regions"] and res.global_score is None and res.alpha == 1.0 and not res.drop
    assert [r.label for r in res.regions] == ["ball"] and res.n_filtered == 1 and res.n_proposed == 2
    assert res.reward_map.R[40, 40].item() == 0.5 and res.reward_map.R[5, 5].item() == pytest.approx(0.8)


def test_no_regions_skips_region_request_and_score_many_bounds_concurrency():
    judge = StubJudge()
    scorer = SampleScorer(judge, NoneProposer(NoRegionsConfig()), RewardConfig(), max_concurrency=2)
    images = [scene() for _ in range(6)]
    res = asyncio.run(scorer.score_many(images, [f"p{i}" for i in range(6)], LATENT))
    assert [r.prompt for r in res] == [f"p{i}" for i in range(6)]
    assert judge.calls == ["global"] * 6 and judge.peak == 2
    assert all(torch.allclose(r.R_latent, torch.full(LATENT, 0.5)) for r in res)
    with pytest.raises(ValueError, match="6 images but 1 prompts"):
        asyncio.run(scorer.score_many(images, ["p"], LATENT))


@pytest.mark.parametrize("policy", ["drop", "neutral", "use"])
def test_an_ambiguous_score_is_never_silently_used(policy):
    judge = StubJudge(g=0.4, region=0.6, doubtful=("regions",))
    scorer = SampleScorer(judge, FixedProposer([(0, 0, 32, 32), (32, 32, 64, 64)]), RewardConfig(),
                          on_ambiguous=policy)
    res = asyncio.run(scorer.score(scene(), "p", LATENT))
    assert res.ambiguous and scorer.counters()["ambiguous"] == 1
    first = res.reward_map.R[5, 5].item()  # region 1 (the ambiguous one), official map: (s + 1) / 2
    if policy == "drop":
        assert res.drop_reason == DropReason.JUDGE_AMBIGUOUS and not res.failed
        assert first == pytest.approx(0.8)  # the map is still built for the gallery
    elif policy == "neutral":
        assert res.drop_reason is None and first == pytest.approx(0.5) and res.regions[0].score == 0.0
    else:
        assert res.drop_reason is None and first == pytest.approx(0.8)
    assert res.reward_map.R[40, 40].item() == pytest.approx(0.8)  # region 2 was read without doubt


def test_an_ambiguous_global_score_under_neutral_is_the_authors_zero():
    judge = StubJudge(g=0.9, doubtful=("global",))
    scorer = SampleScorer(judge, NoneProposer(NoRegionsConfig()), RewardConfig(), on_ambiguous="neutral")
    res = asyncio.run(scorer.score(scene(), "p", LATENT))
    # official semantics drop g == 0 exactly (their parse-failure value): a neutral doubtful global drops too
    assert res.global_score == 0.0 and res.drop_reason == DropReason.GLOBAL_SCORE_ZERO
