"""Transformers judge backend (tiny random Qwen2.5-VL) in all modes; logprob math; schema decoder."""

from __future__ import annotations

import asyncio
import json

import jsonschema
import numpy as np
import pytest
import torch
from PIL import Image

from core.config import TransformersJudgeConfig
from rewards import prompts as Q
from rewards.judge import (
    expected_score,
    positional_regions_schema,
    prepare_image,
    tenths_distribution,
)
from rewards.judge_hf import SchemaDecoder, TransformersJudge
from rewards.tiny_vlm import build_tiny_vlm
from srum.registry import make_judge

IMG = Image.fromarray((np.arange(48 * 64 * 3) % 251).astype(np.uint8).reshape(48, 64, 3))
BOXES = [(0, 0, 20, 20), (10, 5, 60, 40), (3, 3, 9, 9)]


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_vlm("qwen2_5_vl", seed=0)


def hf_judge(tiny, mode, max_tokens=24):
    model, processor = tiny
    return TransformersJudge(TransformersJudgeConfig(mode=mode, max_tokens=max_tokens),
                             model=model, processor=processor)


# ----- pure logprob math -------------------------------------------------------------------------


def test_tenths_distribution_by_hand():
    probs = tenths_distribution({"-": 0.2, "0": 0.5, "1": 0.3}, {"0": 0.25, "1": 0.75},
                                {"4": 1.0}, {"0": 0.5, "6": 0.5})
    assert sum(probs) == pytest.approx(1.0)
    assert probs[20] == pytest.approx(0.3)  # "1.0"
    assert probs[14] == pytest.approx(0.5)  # "0.4"
    assert probs[0] == pytest.approx(0.2 * 0.75)  # "-1.0"
    assert probs[10] == pytest.approx(0.2 * 0.25 * 0.5)  # "-0.0" is 0
    assert probs[4] == pytest.approx(0.2 * 0.25 * 0.5)  # "-0.6"
    # E = 0.3 + 0.5 * 0.4 - 0.15 - 0.025 * 0.6 = 0.335
    assert expected_score(probs) == pytest.approx(0.335)


def test_tenths_distribution_renormalises_and_falls_back_to_uniform():
    probs = tenths_distribution({"1": 2.0, "0": 2.0}, {}, {"9": 0.1, "x": 5.0}, {})
    assert probs[20] == pytest.approx(0.5) and probs[19] == pytest.approx(0.5)
    empty = tenths_distribution({}, {}, {}, {})
    assert sum(empty) == pytest.approx(1.0) and min(empty) >= 0.0


def test_positional_regions_schema():
    schema = positional_regions_schema(Q.regions_json_schema([1, 2, 3]), [1, 2, 3])
    good = {"regions": [{"id": k, "object": "o", "score": 1, "reason": ""} for k in (1, 2, 3)]}
    jsonschema.validate(good, schema)
    dup = {"regions": [{"id": 1, "object": "o", "score": 1, "reason": ""} for _ in range(3)]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dup, schema)
    jsonschema.validate(good, Q.regions_json_schema([1, 2, 3]))  # the same shape as the shared schema


# ----- schema decoder with a scripted model --------------------------------------------------------


class ScriptedCtx:
    """Stands in for the model: prefers the characters of ``target`` at each position."""

    def __init__(self, target: str, free: str = "hello"):
        self.target, self.free = target, free
        self.judge = self
        self.vocab = {chr(i): i for i in range(32, 127)}

    def char_id(self, ch):
        return self.vocab[ch]

    def next_logprobs(self, prefix):
        logits = torch.zeros(128)
        if len(prefix) < len(self.target):
            logits[self.vocab[self.target[len(prefix)]]] = 5.0
        return torch.log_softmax(logits, -1)

    def generate(self, prefix, n, stop=""):
        return self.free[:n] + '"tail', n


def test_schema_decoder_global_choice_follows_model():
    dec = SchemaDecoder(ScriptedCtx('{"score":-7,'), budget=100)
    dec.value(Q.global_json_schema(), "")
    assert json.loads(dec.out) == {"score": -7, "reason": "hello"}
    jsonschema.validate(json.loads(dec.out), Q.global_json_schema())


def test_schema_decoder_tells_1_from_10_and_cuts_strings():
    dec = SchemaDecoder(ScriptedCtx('{"score":10,'), budget=3)
    dec.value(Q.global_json_schema(), "")
    # budget 3: two choice steps ("1" among the first characters, then "0" vs ",") leave 1 string token
    assert json.loads(dec.out) == {"score": 10, "reason": "h"} and dec.tokens == 3
    dec = SchemaDecoder(ScriptedCtx('{"score":1}'), budget=100)
    dec.value({"type": "object", "properties": {"score": {"type": "integer", "minimum": -10, "maximum": 10}}}, "")
    assert dec.out == '{"score":1}'


def test_schema_decoder_free_count_array_and_rejects_unbounded():
    schema = Q.grounding_json_schema(64, 48, max_objects=3)
    dec = SchemaDecoder(ScriptedCtx('[{"label":"hello","box":[1,2,30,40]}]'), budget=100)
    dec.value(schema, "")
    out = json.loads(dec.out)
    jsonschema.validate(out, schema)
    assert out == [{"label": "hello", "box": [1, 2, 30, 40]}]
    with pytest.raises(ValueError, match="not bounded"):
        SchemaDecoder(ScriptedCtx("1"), 10).value({"type": "number"}, "")


# ----- the real tiny model -------------------------------------------------------------------------


def test_make_judge_transformers_is_lazy():
    j = make_judge(TransformersJudgeConfig())
    assert isinstance(j, TransformersJudge) and j.model is None


def test_text_mode_runs_and_counts(tiny):
    j = hf_judge(tiny, "text")
    res = asyncio.run(j.score_global(IMG, "a cat left of a dog"))
    # a random model's text does not parse: counted, not raised
    assert res.outcome in ("parse_failed", "ok", "ambiguous") and res.completion_tokens >= 1
    assert j.counters()["requests"] == 1 and j.counters()[res.outcome] == 1


def test_structured_mode_always_valid(tiny):
    j = hf_judge(tiny, "structured", max_tokens=16)
    g = asyncio.run(j.score_global(IMG, "a cat"))
    jsonschema.validate(json.loads(g.raw), Q.global_json_schema())
    assert g.outcome == "ok" and -1.0 <= g.score <= 1.0 and round(g.score * 10) == json.loads(g.raw)["score"]
    r = asyncio.run(j.score_regions(IMG, "a cat", BOXES))
    doc = json.loads(r.raw)
    jsonschema.validate(doc, positional_regions_schema(Q.regions_json_schema([1, 2, 3]), [1, 2, 3]))
    assert [e["id"] for e in doc["regions"]] == [1, 2, 3]
    assert all(x.score is not None and -1 <= x.score <= 1 for x in r.regions) and r.outcome == "ok"


def test_logprob_mode_expected_score(tiny):
    j = hf_judge(tiny, "logprob", max_tokens=8)
    g = asyncio.run(j.score_global(prepare_image(IMG), "a cat"))
    assert g.outcome == "ok" and len(g.probs) == 21 and sum(g.probs) == pytest.approx(1.0)
    assert g.score == pytest.approx(expected_score(g.probs)) and -1.0 <= g.score <= 1.0
    # the distribution is the model's: not uniform, and deterministic
    assert max(g.probs) - min(g.probs) > 1e-4
    assert asyncio.run(j.score_global(IMG, "a cat")).score == pytest.approx(g.score)
    r = asyncio.run(j.score_regions(IMG, "a cat", BOXES[:2]))
    assert all(x.score is not None and x.probs is not None for x in r.regions)
    assert j.counters()["requests"] == 3 and j.counters()["ok"] == 3


def test_sample_level_prompt_differs(tiny):
    j = hf_judge(tiny, "logprob")
    g = asyncio.run(j.score_global(IMG, "a cat"))
    s = asyncio.run(j.score_sample(IMG, "a cat"))
    assert g.score != pytest.approx(s.score, abs=1e-9)
