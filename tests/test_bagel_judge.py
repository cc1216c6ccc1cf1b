"""Bagel's understanding module as the judge (bagel/judge.py) on the tiny random Bagel: its answers in the
protocol the parsers read (logprob, structured, text), grounding through the generic proposer, the
vision tower against the package's, and that the judge's own copy is the policy's understanding module
at every policy version (so it needs no weight sync)."""

from __future__ import annotations

import asyncio
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("nemo_automodel.components.models.bagel",
                    reason="Bagel's modelling package is not installed: pip install --no-deps "
                           "'nemo-automodel==0.7.0' einops (make setup does it)")

from bagel.backend import navit_sdpa  # noqa: E402
from bagel.bundle import prepare, same_weights_error  # noqa: E402
from bagel.judge import BagelJudge, _Context, vit_input, vit_size  # noqa: E402
from bagel.model import build_tiny_bagel, understanding_logits  # noqa: E402
from bagel.packing import pack_understanding  # noqa: E402
from bagel.policy import BagelPolicy  # noqa: E402
from core.config import BagelJudgeConfig, BagelPolicyConfig, GroundingRegionsConfig  # noqa: E402
from core.config_io import ConfigError, load_config  # noqa: E402
from rewards import parse as P  # noqa: E402
from rewards.judge import prepare_image  # noqa: E402
from rewards.regions import GroundingProposer  # noqa: E402

PROMPT = "a red circle to the left of a blue square"
BOXES = [(0, 0, 32, 32), (16, 8, 60, 56)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for tiny models (see tests/test_bagel_policy.py)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)


def _judge(mode: str, **kw) -> BagelJudge:
    judge = BagelJudge(BagelJudgeConfig(mode=mode, max_tokens=12, device="cpu", **kw))
    asyncio.run(judge.check_health())
    return judge


def test_logprob_mode_gives_valid_expected_scores(image):
    judge = _judge("logprob")
    g = asyncio.run(judge.score_global(image, PROMPT))
    assert g.outcome == "ok" and -1 <= g.score <= 1 and abs(sum(g.probs) - 1) < 1e-6
    regions = asyncio.run(judge.score_regions(image, PROMPT, BOXES))
    assert len(regions.regions) == 2 and all(r.score is not None and -1 <= r.score <= 1 for r in regions.regions)
    counters = judge.counters()
    assert counters["backend"] == "bagel" and counters["requests"] == 2 and counters["source"] == "tiny:0"


def test_structured_mode_answers_json_the_parser_reads(image):
    judge = _judge("structured")
    g = asyncio.run(judge.score_global(image, PROMPT))
    assert g.outcome == "ok" and g.score in {t / 10 for t in range(-10, 11)}
    assert P.parse_score_json(g.raw).score == g.score
    regions = asyncio.run(judge.score_regions(image, PROMPT, BOXES))
    assert regions.outcome == "ok" and [r.score is not None for r in regions.regions] == [True, True]


def test_text_mode_decodes_greedily_and_the_parser_reads_its_answer(image):
    judge = _judge("text")
    ctx = _Context(judge, prepare_image(image), "Describe the image.")
    text, n = ctx.generate("Score: ", 6)
    ids = judge.tokenizer.encode("Score: ", add_special_tokens=False)
    expected = []
    for _ in range(n):  # the same tokens by hand: argmax of the understanding logits, one at a time
        packed = pack_understanding(ctx.vit.shape[0], ctx.request, ids + expected, judge.parts.tokens)
        expected.append(int(torch.argmax(understanding_logits(judge.parts, packed, ctx.vit, "sdpa"))))
    assert text == judge.tokenizer.decode(expected, skip_special_tokens=True) and 1 <= n <= 6
    g = asyncio.run(judge.score_global(image, PROMPT))  # a random model's free text: counted, never raised
    assert g.score is None or -1 <= g.score <= 1
    assert judge.counters()["requests"] == 1 and judge.counters()[g.outcome] == 1


def test_grounding_proposer_asks_bagel_for_boxes(image):
    judge = _judge("structured")
    proposer = GroundingProposer(GroundingRegionsConfig(), judge)
    boxes = asyncio.run(proposer.apropose(image, PROMPT))
    assert isinstance(boxes, list) and len(boxes) <= 5
    assert proposer.counters()["calls"] == 1 and judge.counters()["requests"] == 1


def test_the_judges_copy_is_the_policys_understanding_at_every_version(image):
    """Training changes only generation-side tensors, and the understanding path uses none of them: a
    trained policy's model and a fresh judge copy give identical understanding logits."""
    policy = BagelPolicy.from_config(BagelPolicyConfig(device="cpu"))
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.1)
    judge = _judge("logprob")
    ctx_policy = _Context(BagelJudge(BagelJudgeConfig(device="cpu"), parts=policy.parts), prepare_image(image), PROMPT)
    ctx_judge = _Context(judge, prepare_image(image), PROMPT)
    assert torch.equal(ctx_policy.next_logprobs("Score: "), ctx_judge.next_logprobs("Score: "))


def test_navit_sdpa_matches_the_packages_flash_attention_tower(monkeypatch, image):
    """The package's SigLIP layers call flash_attn_varlen_func (CUDA); with an exact SDPA stand-in for it
    (test only), the package's own tower and srum's loop over its layers agree."""
    siglip = sys.modules["nemo_automodel.components.models.bagel.modeling_siglip_navit"]

    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
        out = [torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)).transpose(0, 1)
            for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist(), strict=True)]
        return torch.cat(out)

    monkeypatch.setattr(siglip, "_flash_attn_varlen", varlen)
    parts = build_tiny_bagel(0).to(torch.device("cpu"), torch.bfloat16)  # the package casts q/k/v to bf16
    pixels, pos = vit_input(prepare_image(image), 8, 8)
    pixels = torch.cat([pixels, pixels[:16] * 0.5]).to(torch.bfloat16)  # two images packed
    pos = torch.cat([pos, pos[:16]])
    vit = parts.model.model.vit_model
    with torch.no_grad():
        theirs = vit(packed_pixel_values=pixels, packed_flattened_position_ids=pos,
                     cu_seqlens=torch.tensor([0, 64, 80], dtype=torch.int32), max_seqlen=64)
        ours = navit_sdpa(vit, pixels, pos, [64, 16])
    torch.testing.assert_close(ours.float(), theirs.float(), atol=3e-2, rtol=3e-2)


def test_vit_input_follows_bagels_resize_rule():
    assert vit_size(64, 64, 8, 64, 64) == (64, 64)
    assert vit_size(1024, 512, 14, 980, 224) == (980, 490)  # long side capped at 980, multiples of 14
    assert vit_size(100, 100, 14, 980, 224) == (224, 224)  # short side raised to 224
    pixels, pos = vit_input(prepare_image(np.zeros((40, 80, 3), np.uint8)), 8, 8)
    assert pixels.shape == (32, 192) and float(pixels.min()) == -1.0 and pos.tolist()[:3] == [0, 1, 2]


def test_prepare_refuses_a_judge_that_is_not_the_policys_own_model():
    cfg = load_config("configs/tiny_bagel.yaml")
    prepare(cfg)  # same tiny_seed: fine
    with pytest.raises(ConfigError, match="judge.pretrained / judge.tiny_seed"):
        prepare(load_config("configs/tiny_bagel.yaml", ["judge.tiny_seed=1"]))
    assert same_weights_error(BagelPolicyConfig(pretrained="/m/bagel", tiny=False),
                              BagelJudgeConfig(pretrained="/m/bagel/", tiny=False)) is None
    with pytest.raises(ValueError, match="greater than or equal to 16"):
        BagelJudgeConfig(max_request_tokens=4)
