"""Shapes understanding module: perception accuracy, proposer, judge protocol end to end."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from core.config import ComponentsRegionsConfig, RewardConfig, ShapesJudgeConfig
from rewards import parse as P
from rewards import prompts as Q
from rewards.judge import PROBE_TREE, expected_score, prepare_image, tenths_distribution
from rewards.scorer import SampleScorer
from shapes.judge import (
    ComponentsProposer,
    ShapesJudge,
    probe_probs,
    request_boxes,
    request_kind,
    request_prompt,
)
from shapes.perception import ShapesPerception, TrainSettings, components, perception_accuracy
from shapes.world import make_split, parse_prompt, prompt_of, render

SPATIAL = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def perception():
    """Default recipe, cached in $SRUM_CACHE or ~/.cache/srum (trains once, ~10-30 s)."""
    return ShapesPerception.load_or_train()


@pytest.fixture(scope="module")
def heldout_specs():
    train, held = make_split(0)
    rng = np.random.default_rng(11)
    return held + [train[i] for i in rng.choice(len(train), 80, replace=False)]


def run(coro):
    return asyncio.run(coro)


def test_perception_accuracy_on_fresh_renders(perception, heldout_specs):
    clean = perception_accuracy(perception, heldout_specs, seed=1234)
    degraded = perception_accuracy(perception, heldout_specs, seed=1234, blur=True, noise=8.0)
    print(f"perception accuracy: clean {clean:.3f}, blur+noise {degraded:.3f}")
    assert clean >= 0.95
    assert degraded >= 0.9


def test_training_is_deterministic_and_cache_round_trips(tmp_path):
    s = TrainSettings(seed=3, n_train=256, epochs=1, batch_size=64)
    a = ShapesPerception.load_or_train(s, directory=tmp_path)
    files = list(tmp_path.glob("shapes_perception_*.safetensors"))
    assert len(files) == 1 and s.key() in files[0].name
    b = ShapesPerception.load_or_train(s, directory=tmp_path)  # loaded, not trained
    c = ShapesPerception.train(s)
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]) and torch.equal(v, c.net.state_dict()[k])
    assert TrainSettings(seed=4).key() != TrainSettings(seed=3).key()


def test_components_and_proposer():
    img = np.full((32, 32, 3), 255, np.uint8)
    img[2:10, 3:9] = (220, 30, 30)  # 48 px
    img[20:30, 18:30] = (40, 60, 220)  # 120 px
    img[15, 15] = (0, 0, 0)  # 1 px speck: under the minimum area
    comps = components(img)
    assert [c.box for c in comps] == [(18, 20, 30, 30), (3, 2, 9, 10)] and [c.area for c in comps] == [120, 48]
    prop = ComponentsProposer(ComponentsRegionsConfig(top_k=1))
    assert prop.propose(img, "x") == [(17.0, 19.0, 31.0, 31.0)]  # padded by 1 px, largest only
    prop2 = ComponentsProposer(ComponentsRegionsConfig(top_k=5), pad=0)
    boxes = run(prop2.apropose(img, "x"))
    assert [p.box for p in boxes] == [(18.0, 20.0, 30.0, 30.0), (3.0, 2.0, 9.0, 10.0)]
    assert prop.counters()["calls"] == 1 and prop2.counters()["proposed"] == 2


def test_request_reading_matches_prompt_builders():
    tricky = 'a "quoted" prompt\nScore: 1.0'
    assert request_kind(Q.global_layout_prompt(SPATIAL)) == "global"
    assert request_kind(Q.global_layout_prompt(SPATIAL, structured=True)) == "global"
    assert request_kind(Q.sample_level_prompt(SPATIAL)) == "sample"
    assert request_kind(Q.grounding_prompt(SPATIAL, 32, 32)) == "grounding"
    assert request_kind("hello") is None
    assert request_prompt(Q.global_layout_prompt(tricky)) == tricky
    text = Q.region_prompt(SPATIAL, [(1, 2, 10, 12), (15.5, 0, 32, 31.4)])
    assert request_kind(text) == "regions" and request_prompt(text) == SPATIAL
    assert request_boxes(text) == {1: (1, 2, 10, 12), 2: (16, 0, 32, 31)}


@pytest.mark.parametrize("score", [1.0, 0.87, 0.4, 0.0, -0.05, -0.6, -0.93, -1.0])
def test_probe_probs_reproduce_the_score(score):
    outs = [probe_probs(score, suffix, chars) for suffix, chars in PROBE_TREE]
    for o in outs:
        assert sum(o.values()) == pytest.approx(1.0)
    assert expected_score(tenths_distribution(*outs)) == pytest.approx(score, abs=1e-9)


def _score(judge, img, prompt, proposer_cfg=None):
    scorer = SampleScorer(judge, ComponentsProposer(proposer_cfg or ComponentsRegionsConfig()), RewardConfig())
    res = run(scorer.score(img, prompt, (8, 8)))
    assert not res.failed, res.error
    return res


@pytest.mark.parametrize("mode", ["text", "structured", "logprob"])
def test_judge_end_to_end_prefers_the_correct_image(perception, mode):
    judge = ShapesJudge(ShapesJudgeConfig(mode=mode), perception=perception)
    rng = np.random.default_rng(5)
    good = render(parse_prompt(SPATIAL), 32, rng)
    swapped = render(parse_prompt("a red circle to the right of a blue square"), 32, rng)
    recolored = render(parse_prompt("a yellow circle to the left of a green square"), 32, rng)
    g, s, r = (_score(judge, im, SPATIAL) for im in (good, swapped, recolored))
    assert g.global_score >= 0.8 and s.global_score <= -0.7 and r.global_score <= -0.8
    assert [x.label for x in g.regions] in (["a red circle", "a blue square"], ["a blue square", "a red circle"])
    assert all(x.score >= 0.75 for x in g.regions)
    assert all(x.score == pytest.approx(-0.6) for x in r.regions)
    wg, ws, wr = (float((x.R_latent * x.alpha).mean()) for x in (g, s, r))
    assert wg > ws and wg > wr
    assert float(g.R_latent.mean()) > float(r.R_latent.mean())
    c = judge.counters()
    assert c["requests"] == 6 and c["ok"] == 6 and c["parse_failed"] == 0 and c["ambiguous"] == 0


def test_judge_text_answers_parse_without_warnings(perception):
    judge = ShapesJudge(ShapesJudgeConfig(mode="text"), perception=perception)
    rng = np.random.default_rng(9)
    train, held = make_split(0)
    for spec in held[::4]:
        img = prepare_image(render(spec, 32, rng))
        prompt = prompt_of(spec)
        for builder in (Q.global_layout_prompt, Q.sample_level_prompt):
            p = P.parse_score_text(run(judge._chat(img, builder(prompt), 512)).text)
            assert p.warnings == () and p.score is not None and p.reason
        boxes = [p.box for p in run(ComponentsProposer(ComponentsRegionsConfig()).apropose(img, prompt))]
        ids = list(range(1, len(boxes) + 1))
        rp = P.parse_regions_text(run(judge._chat(img, Q.region_prompt(prompt, boxes), 512)).text, ids)
        assert rp.warnings == () and all(rp.regions[k].score is not None and rp.regions[k].identified_object
                                         for k in ids)
        rj = P.parse_regions_json(run(judge._chat(img, Q.region_prompt(prompt, boxes, True), 512, {})).text, ids)
        assert rj.warnings == ()


def test_judge_scores_by_category(perception):
    judge = ShapesJudge(ShapesJudgeConfig(mode="text"), perception=perception)
    rng = np.random.default_rng(2)

    def glob(prompt, drawn):
        img = render(parse_prompt(drawn), 32, rng)
        return P.parse_score_text(run(judge._chat(prepare_image(img), Q.global_layout_prompt(prompt), 512)).text).score

    assert glob("a red circle", "a red circle") == pytest.approx(0.4)  # neutral band, all present
    assert glob("a red circle", "a blue circle") == pytest.approx(-0.1 - 0.1)  # missing + one extra object
    assert glob("three green squares", "three green squares") == pytest.approx(0.4)
    assert glob("three green squares", "two green squares") == pytest.approx(-0.1)
    assert glob("a red circle and a blue square", "a red circle and a blue square") == pytest.approx(0.4)
    # out-of-grammar prompt: exactly neutral (the official reward map drops the sample)
    img = prepare_image(render(parse_prompt("a red circle"), 32, rng))
    out = run(judge._chat(img, Q.global_layout_prompt("a photo of a cat"), 512)).text
    assert P.parse_score_text(out).score == 0.0 and "grammar" in out
    blob = np.full((32, 32, 3), 255, np.uint8)
    blob[4:8, 2:30] = (220, 30, 30)  # a long bar: no shape of this world
    res = _score(judge, blob, "a red square")
    assert res.regions[0].score == pytest.approx(-0.8) and "unrecognisable" in res.regions[0].label
