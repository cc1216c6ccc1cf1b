"""Tests for rewards/parse.py: a table of real-looking answers, region rules, JSON, properties."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewards.parse import (
    AMBIGUITY_CODES,
    MAX_INPUT_CHARS,
    W_AMBIGUOUS_NUMBER,
    W_AMBIGUOUS_SCORES,
    W_BAD_BOX,
    W_BAD_JSON,
    W_BAD_SCORE_TYPE,
    W_CLAMPED,
    W_DUPLICATE_REGION,
    W_EMPTY,
    W_FRACTION,
    W_INTERNAL_ERROR,
    W_MISSING_REGION,
    W_MULTIPLE_SCORES,
    W_NO_REASON,
    W_NO_REGION_HEADER,
    W_NO_SCORE,
    W_NONFINITE,
    W_NOT_TEXT,
    W_OTHER_SCALE,
    W_PERCENT,
    W_TRUNCATED,
    W_TRUNCATED_THINK,
    W_UNCLOSED_THINK,
    W_UNKNOWN_REGION,
    RegionsParse,
    ScoreParse,
    parse_grounding_json,
    parse_regions_json,
    parse_regions_text,
    parse_score_json,
    parse_score_text,
)

NR, NS = W_NO_REASON, W_NO_SCORE

# (answer, expected score, expected reason, expected warning codes)
SCORE_TABLE = [
    (
        "Score: 0.8\nReason: The cat sits left of the dog as asked.",
        0.8,
        "The cat sits left of the dog as asked.",
        set(),
    ),
    (
        "**Score:** 0.9\n**Reason:** The red cube is clearly on top of the blue sphere.",
        0.9,
        "The red cube is clearly on top of the blue sphere.",
        set(),
    ),
    (
        "<think>\nThe prompt wants a horse hiding a microwave. Score: 0.2 maybe?\n</think>\n\nScore: 0.95\n"
        "Reason: The horse stands in front of the microwave.",
        0.95,
        "The horse stands in front of the microwave.",
        set(),
    ),
    (
        "Okay, let me look. Score: -0.3 seems harsh.\n</think>\n\nScore: 0.4\nReason: Generic layout; no spatial request.",
        0.4,
        "Generic layout; no spatial request.",
        set(),
    ),
    (  # issue 12: a score only inside an unclosed <think> is ambiguous (was plain ok)
        "<think>The dog is left of the cat, which matches.\nScore: 0.7\nReason: Matches the prompt.",
        0.7,
        "Matches the prompt.",
        {W_UNCLOSED_THINK, W_TRUNCATED_THINK},
    ),
    ("<think>\nLet me analyze the spatial relation between", None, "", {W_UNCLOSED_THINK, NS, NR}),
    ("<THINK>hidden</THINK>Score: 0.1\nReason: Plain scene.", 0.1, "Plain scene.", set()),
    (
        "Score: \u22120.7\nReason: The cat is on the right, the prompt asked for the left.",
        -0.7,
        "The cat is on the right, the prompt asked for the left.",
        set(),
    ),
    ("Score: \u20130.5\nReason: Wrong order.", -0.5, "Wrong order.", set()),
    ("Score: +0.6\nReason: Mostly right.", 0.6, "Mostly right.", set()),
    ("Score: 1\nReason: Perfect.", 1.0, "Perfect.", set()),
    # issue 12: another scale is read on the tenths scale and is ambiguous (was clamped to +-1.0)
    ("Score: 7\nReason: Good.", 0.7, "Good.", {W_OTHER_SCALE}),
    ("Score: -3.5\nReason: Awful.", -0.35, "Awful.", {W_OTHER_SCALE}),
    ("Score: 1e400\nReason: x", 1.0, "x", {W_OTHER_SCALE, W_CLAMPED}),
    ("Score: .5\nReason: Fine.", 0.5, "Fine.", set()),
    ("Score: -0.\nReason: Neutral.", 0.0, "Neutral.", set()),
    ("Score: 7/10\nReason: Nearly.", 0.7, "Nearly.", {W_FRACTION, W_OTHER_SCALE}),  # issue 12: other scale
    ("Final Score: 0.8/1.0\nReason: Good.", 0.8, "Good.", {W_FRACTION}),
    ("Score: 8 out of 10\nReason: Nice.", 0.8, "Nice.", {W_FRACTION, W_OTHER_SCALE}),  # issue 12
    ("Score: 3/0\nReason: x", None, "x", {W_FRACTION, W_NONFINITE, NS}),
    ("Score: 80%\nReason: Good.", None, "Good.", {W_PERCENT, NS}),
    ("Score: N/A\nReason: The image is blank.", None, "The image is blank.", {NS}),
    ("Score: NaN\nReason: Unsure.", None, "Unsure.", {W_NONFINITE, NS}),
    ("Score: -inf", None, "", {W_NONFINITE, NS, NR}),
    ("I cannot evaluate this image because it appears to be corrupted.", None, "", {NS, NR}),
    (  # issue 12: conflicting scores are ambiguous; the latest is the best reading (was plain ok)
        "Score: 0.6\nReason: The vase is left of the book.\n\nWait, the vase is partly behind the book.\n"
        "Score: 0.4\nReason: Left of, but partly behind the book.",
        0.4,
        "Left of, but partly behind the book.",
        {W_MULTIPLE_SCORES, W_AMBIGUOUS_SCORES},
    ),
    (  # issue 12: a Final Score that disagrees with the Layout score is ambiguous (was plain ok)
        "- Relevance: good\n- **Layout score:** 0.7\n- **Final Score:** 0.8\n\nReason: The bench is in front of the tree.",
        0.8,
        "The bench is in front of the tree.",
        {W_MULTIPLE_SCORES, W_AMBIGUOUS_SCORES},
    ),
    (
        "Relevance score: 0.9\nQuality score: 0.4\nOverall score: 0.6\nReason: Right objects, distorted hands.\n"
        "Composition score: 0.1",
        0.6,
        "Right objects, distorted hands.",
        {W_MULTIPLE_SCORES},
    ),
    # issue 12: two sub-scores and no overall one disagree: ambiguous (was plain ok)
    ("Quality score: 0.4\nRelevance score: 0.8\nReason: x", 0.8, "x", {W_MULTIPLE_SCORES, W_AMBIGUOUS_SCORES}),
    (
        "### Score: 0.3\n### Reason: Generic street scene, no layout requested.",
        0.3,
        "Generic street scene, no layout requested.",
        set(),
    ),
    ("1. Score: 0.5\n2. Reason: Mostly right.", 0.5, "Mostly right.", set()),
    (
        "**Score:**\n0.75\n\n**Reason:**\nThe two cups are side by side as requested.",
        0.75,
        "The two cups are side by side as requested.",
        set(),
    ),
    # issue 12: "- 0.8" under the label is a bullet or a minus: read as a bullet, ambiguous (was plain ok)
    ("**Score:**\n- 0.8\n**Reason:** bullet under the label", 0.8, "bullet under the label", {W_AMBIGUOUS_NUMBER}),
    ("Score: [0.85]\nReason: Good alignment.", 0.85, "Good alignment.", set()),
    ("Score (from -1.0 to 1.0): -0.8\nReason: The sign reads 'HELO'.", -0.8, "The sign reads 'HELO'.", set()),
    ("Score: 0.9 Reason: The kite flies above the house.", 0.9, "The kite flies above the house.", set()),
    (
        "Sure! Here is my evaluation of the image.\n\nScore: 0.65\nReason: The laptop is on the desk,\n"
        "but the cup is missing.\n\nLet me know if you need anything else!",
        0.65,
        "The laptop is on the desk,\nbut the cup is missing.",
        set(),
    ),
    ("Score\uff1a\uff10.\uff17\nReason: Full-width digits.", 0.7, "Full-width digits.", set()),
    ("Score = 0.3\nReason: ok", 0.3, "ok", set()),
    ("Score: **-0.9**\nReason: The dog has five legs.", -0.9, "The dog has five legs.", set()),
    ("*Score*: 0.8\n*Reason*: Italic labels.", 0.8, "Italic labels.", set()),
    ("__Score__: 0.2\n__Reason__: Underscore labels.", 0.2, "Underscore labels.", set()),
    (
        "Score: <number between -1.0 and 1.0>\nReason: <why>\n\nScore: 0.3\nReason: Plain layout.",
        0.3,
        "Plain layout.",
        set(),
    ),
    ("Overall, I'd give it a high score: 0.9 since it matches.", None, "", {NS, NR}),
    ("Score: 0.7.\nReason: Trailing period.", 0.7, "Trailing period.", set()),
    ("Score: 0.8 \u2014 the composition is good", 0.8, "", {NR}),
    (
        "> **Score**: -0.2\n> **Reasoning**: Slightly off-centre, nothing requested.",
        -0.2,
        "Slightly off-centre, nothing requested.",
        set(),
    ),
    ("Score: 0.5\nScore: 0.5\nReason: Repeated.", 0.5, "Repeated.", {W_MULTIPLE_SCORES}),
    ("", None, "", {W_EMPTY, NS}),
    ("<think>only thoughts</think>   \n", None, "", {W_EMPTY, NS}),
]


def check_score(p: ScoreParse) -> None:
    """Invariants every ScoreParse must satisfy."""
    assert isinstance(p, ScoreParse)
    assert W_INTERNAL_ERROR not in p.warnings
    assert len(set(p.warnings)) == len(p.warnings)
    assert p.clamped == (W_CLAMPED in p.warnings)
    assert p.ambiguous == (not AMBIGUITY_CODES.isdisjoint(p.warnings))
    if p.ambiguous or p.clamped:
        assert p.score is not None
    if p.score is None:
        assert W_NO_SCORE in p.warnings and not p.clamped
    else:
        assert math.isfinite(p.score) and -1.0 <= p.score <= 1.0
        assert W_NO_SCORE not in p.warnings
        if p.clamped:
            assert p.score in (-1.0, 1.0)


def check_regions(r: RegionsParse, expected: list[int]) -> None:
    assert isinstance(r, RegionsParse)
    assert list(r.regions) == expected
    assert r.ambiguous == any(p.ambiguous for p in r.regions.values())
    for p in r.regions.values():
        check_score(p)
        assert set(p.warnings) <= set(r.warnings)
    assert W_INTERNAL_ERROR not in r.warnings


@pytest.mark.parametrize(("answer", "score", "reason", "warnings"), SCORE_TABLE)
def test_score_table(answer: str, score: float | None, reason: str, warnings: set[str]) -> None:
    p = parse_score_text(answer)
    check_score(p)
    assert p.score == score
    assert p.reason == reason
    assert set(p.warnings) == warnings
    assert p.identified_object is None


@pytest.mark.parametrize("value", [None, 42, b"Score: 0.5", ["Score: 0.5"]])
def test_non_text_input(value: object) -> None:
    for p in (parse_score_text(value), parse_score_json(value)):
        assert p.score is None and set(p.warnings) == {W_NOT_TEXT, NS}
    r = parse_regions_text(value, [1, 2])
    assert all(e.score is None for e in r.regions.values()) and W_NOT_TEXT in r.warnings


def test_long_input_keeps_tail() -> None:
    p = parse_score_text("x" * (MAX_INPUT_CHARS + 10) + "\nScore: 0.2\nReason: end")
    assert (p.score, p.reason, set(p.warnings)) == (0.2, "end", {W_TRUNCATED})


# ------------------------------------------------------------------ regions (text)

WELL_FORMED = """Region ID: 1
Identified Object: A running golden retriever.
Score: 0.9
Reason: Matches the prompt; fur looks natural.
---
Region ID: 2
Identified Object: A tall green tree in the background.
Score: 0.2
Reason: Harmless background element.
---
"""


def test_regions_well_formed() -> None:
    r = parse_regions_text(WELL_FORMED, [1, 2])
    check_regions(r, [1, 2])
    assert r.warnings == ()
    assert r.regions[1] == ScoreParse(
        score=0.9,
        reason="Matches the prompt; fur looks natural.",
        identified_object="A running golden retriever.",
    )
    assert (
        r.regions[2].score == 0.2 and r.regions[2].identified_object == "A tall green tree in the background."
    )


def test_regions_chatty_out_of_order_bold_multiline() -> None:
    answer = (
        "<think>Region 1 looks like a dog. Score: 0.1</think>\n"
        "Sure, here is the analysis of each region.\n\n"
        "### **Region ID: 2**\n- **Identified Object:** A wooden bench\n- **Score:** \u22120.6\n"
        "- **Reason:** The bench legs are melted\n  into the ground and one armrest floats.\n\n"
        "### **Region ID: 1**\n- **Identified Object:** A corgi\n- **Score:** 0.85\n- **Reason:** Sharp and relevant.\n"
    )
    r = parse_regions_text(answer, [1, 2])
    check_regions(r, [1, 2])
    assert r.regions[1].score == 0.85 and r.regions[1].identified_object == "A corgi"
    assert r.regions[2].score == -0.6
    assert r.regions[2].reason == "The bench legs are melted\ninto the ground and one armrest floats."
    assert r.warnings == ()


@pytest.mark.parametrize(
    "header",
    [
        "Region ID: 1",
        "Region 1:",
        "**Region ID: 1**",
        "Region ID 1",
        "### Region ID: 1",
        "Region #1",
        "[Region ID: 1]",
        "region id: 1",
        "1. **Region 1**",
    ],
)
def test_region_header_variants(header: str) -> None:
    r = parse_regions_text(
        f"{header}\nIdentified Object: cat\nScore: -0.4\nReason: blurry\n\n"
        "Region ID: 2\nScore: 0.3\nReason: ok",
        [1, 2],
    )
    check_regions(r, [1, 2])
    assert (r.regions[1].score, r.regions[1].identified_object, r.regions[2].score) == (-0.4, "cat", 0.3)


def test_region_missing_duplicate_unknown() -> None:
    answer = (
        "Region ID: 1\nScore: 0.5\nReason: first\n"
        "Region ID: 4\nScore: 0.9\nReason: not asked for\n"
        "Region ID: 1\nScore: -0.5\nReason: second\n"
    )
    r = parse_regions_text(answer, [1, 2, 3])
    check_regions(r, [1, 2, 3])
    assert r.regions[1].score == 0.5 and r.regions[1].reason == "first"
    # issue 12: duplicates that disagree are ambiguous (the first is the best reading)
    assert {W_DUPLICATE_REGION, W_AMBIGUOUS_SCORES} <= set(r.regions[1].warnings) and r.regions[1].ambiguous
    for rid in (2, 3):
        assert r.regions[rid].score is None and W_MISSING_REGION in r.regions[rid].warnings
    assert set(r.warnings) == {W_UNKNOWN_REGION, W_DUPLICATE_REGION, W_AMBIGUOUS_SCORES, W_MISSING_REGION, NS}


def test_region_restated_headers_are_no_duplicates() -> None:
    answer = (
        "The regions are:\nRegion ID: 1, box [10, 20, 30, 40]\nRegion ID: 2, box [0, 0, 64, 64]\n\n"
        "Region ID: 1\nScore: 0.4\nReason: a\n\nRegion ID: 2\nScore: -1\nReason: b"
    )
    r = parse_regions_text(answer, [1, 2])
    check_regions(r, [1, 2])
    assert (r.regions[1].score, r.regions[2].score) == (0.4, -1.0)
    assert r.warnings == ()


def test_region_block_without_score_and_other_scale() -> None:
    r = parse_regions_text(
        "Region 1: Identified Object: sky\nReason: cannot judge\nRegion 2: Score: 3", [1, 2]
    )
    check_regions(r, [1, 2])
    assert r.regions[1].score is None and r.regions[1].identified_object == "sky"
    assert set(r.regions[1].warnings) == {NS}
    # issue 12: "Score: 3" on a [-1, 1] prompt is another scale: 0.3 and ambiguous (was clamped to 1.0)
    assert r.regions[2].score == 0.3 and r.regions[2].ambiguous and not r.regions[2].clamped
    assert set(r.warnings) == {NS, W_OTHER_SCALE, NR}


def test_region_no_header() -> None:
    one = parse_regions_text("Identified Object: a cat\nScore: 0.6\nReason: fine", [3])
    assert one.regions[3].score == 0.6 and set(one.warnings) == {W_NO_REGION_HEADER}
    many = parse_regions_text("Score: 0.6\nReason: fine", [1, 2])
    check_regions(many, [1, 2])
    assert all(p.score is None for p in many.regions.values())
    assert set(many.warnings) == {W_NO_REGION_HEADER, W_MISSING_REGION, NS}


def test_region_expected_ids_are_normalised() -> None:
    r = parse_regions_text(WELL_FORMED, [2, 1, 2, "x"])  # type: ignore[list-item]
    assert list(r.regions) == [2, 1]


# ------------------------------------------------------------------ JSON


@pytest.mark.parametrize(
    ("answer", "score", "warnings"),
    [
        ('{"score": 7, "reason": "ok"}', 0.7, set()),
        ('{"score": 1, "reason": "ok"}', 0.1, set()),
        ('{"score": -10, "reason": "ok"}', -1.0, set()),
        ('{"score": 15, "reason": "ok"}', 1.0, {W_CLAMPED}),
        ('{"score": -99999999999999999999999, "reason": "ok"}', -1.0, {W_CLAMPED}),
        ('{"score": 0.7, "reason": "ok"}', 0.7, set()),
        # issue 12: the scale does not depend on the JSON type: 1.0 is 1 tenth like 1, but written
        # with a point it may mean 1.0, so it is ambiguous; 2.5 tenths is 0.25 (was 1.0 / clamped)
        ('{"score": 1.0, "reason": "ok"}', 0.1, {W_OTHER_SCALE}),
        ('{"score": 2.5, "reason": "ok"}', 0.25, set()),
        ('{"score": "0.7", "reason": "ok"}', 0.7, set()),
        ('{"Score": "\u22120.3", "Reason": "ok"}', -0.3, set()),
        ('```json\n{"score": -4, "reason": "ok"}\n```', -0.4, set()),
        ('Here you go:\n{"score": 6, "reason": "ok"} Hope that helps.', 0.6, set()),
        ('<think>{"score": 9}</think>{"score": 3, "reason": "ok"}', 0.3, set()),
        ('{"score": true, "reason": "ok"}', None, {W_BAD_SCORE_TYPE, NS}),
        ('{"score": [7], "reason": "ok"}', None, {W_BAD_SCORE_TYPE, NS}),
        ('{"score": null, "reason": "ok"}', None, {NS}),
        ('{"score": NaN, "reason": "ok"}', None, {W_NONFINITE, NS}),
        ('{"score": 7, "reason": ', None, {W_BAD_JSON, NS, NR}),
        ("Score: 0.4\nReason: ok", 0.4, {W_BAD_JSON}),
    ],
)
def test_score_json(answer: str, score: float | None, warnings: set[str]) -> None:
    p = parse_score_json(answer)
    check_score(p)
    assert p.score == score and set(p.warnings) == warnings
    if W_NO_REASON not in warnings:
        assert p.reason == "ok"


def test_regions_json() -> None:
    ans = (
        '```json\n{"regions": [{"id": 2, "object": "tree", "score": 2, "reason": "bg"},'
        '{"id": "1", "object": "dog", "score": -7, "reason": "six legs"},'
        '{"id": 1, "object": "dog", "score": 9, "reason": "again"},'
        '{"id": 9, "object": "x", "score": 0, "reason": "?"}, "junk"]}\n```'
    )
    r = parse_regions_json(ans, [1, 2, 3])
    check_regions(r, [1, 2, 3])
    assert r.regions[1] == ScoreParse(  # issue 12: the duplicates disagree (-7, 9): ambiguous
        score=-0.7,
        reason="six legs",
        identified_object="dog",
        warnings=(W_DUPLICATE_REGION, W_AMBIGUOUS_SCORES),
        ambiguous=True,
    )
    assert r.regions[2].score == pytest.approx(0.2) and r.regions[2].identified_object == "tree"
    assert r.regions[3].score is None
    assert set(r.warnings) == {W_UNKNOWN_REGION, W_DUPLICATE_REGION, W_AMBIGUOUS_SCORES, W_MISSING_REGION, NS}


def test_regions_json_bare_list_and_fallback() -> None:
    r = parse_regions_json('[{"id": 1, "object": "cat", "score": 10, "reason": "crisp"}]', [1])
    assert r.regions[1].score == 1.0 and r.warnings == ()
    fb = parse_regions_json(WELL_FORMED, [1, 2])
    assert (fb.regions[1].score, fb.regions[2].score) == (0.9, 0.2)
    assert set(fb.warnings) == {W_BAD_JSON}


def test_grounding_json() -> None:
    ans = (
        '```json\n[{"bbox_2d": [-5, 2, 30, 80], "label": "cat"}, {"box": [5, 5, 5, 9], "label": "flat"},'
        ' {"box": [1, 2, "x", 4]}, {"label": "dog", "box": [10.5, 0, 20, 10]}]\n```'
    )
    g = parse_grounding_json(ans, 32, 40)
    assert [(b.label, b.box) for b in g.boxes] == [
        ("cat", (0.0, 2.0, 30.0, 40.0)),
        ("dog", (10.5, 0.0, 20.0, 10.0)),
    ]
    assert g.warnings == (W_BAD_BOX,)
    assert parse_grounding_json('{"objects": []}', 8, 8).boxes == ()
    assert parse_grounding_json("no boxes here", 8, 8).warnings == (W_BAD_JSON,)


# ------------------------------------------------------------------ properties

VALID_ANSWERS = [
    "Score: 0.8\nReason: The cat sits left of the dog.",
    "<think>hmm</think>\n**Score:** \u22120.7\n**Reason:** wrong side",
    WELL_FORMED,
    '{"score": 7, "reason": "ok"}',
    '{"regions": [{"id": 1, "object": "dog", "score": -3, "reason": "blur"}]}',
    '[{"bbox_2d": [1, 2, 30, 40], "label": "cat"}]',
]
JUNK = st.one_of(
    st.text(max_size=12),
    st.sampled_from(
        [
            "Score:",
            "Reason:",
            "Region ID: 7",
            "Region 2:",
            "<think>",
            "</think>",
            "**",
            "```json",
            "{",
            "}",
            "[",
            "\u2212",
            "\u2013",
            "1e999",
            "-" + "9" * 400,
            "nan",
            "inf",
            "%",
            "/0",
            "/",
            "\n",
            "Final Score: ",
            "Identified Object:",
            '"score": ',
            "0.",
            ".5",
            "\x00",
            "\ufeff",
            "\U0001f600",
            "Score: 1/0",
            "\n---\n",
            "   " * 50,
        ]
    ),
)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(VALID_ANSWERS))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 10)))
        if op == "insert":
            text = text[:i] + draw(JUNK) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        elif op == "replace":
            text = text[:i] + draw(JUNK) + text[j:]
        else:
            text = text[:i] + text[i:j] * draw(st.integers(2, 5)) + text[j:]
    return text


def check_all(text: str) -> None:
    check_score(parse_score_text(text))
    check_score(parse_score_json(text))
    check_regions(parse_regions_text(text, [1, 2, 3]), [1, 2, 3])
    check_regions(parse_regions_json(text, [1, 2]), [1, 2])
    g = parse_grounding_json(text, 32, 32)
    assert W_INTERNAL_ERROR not in g.warnings
    assert all(0 <= b.box[0] < b.box[2] <= 32 and 0 <= b.box[1] < b.box[3] <= 32 for b in g.boxes)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_property_arbitrary_text(text: str) -> None:
    check_all(text)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_property_mutated_answers(text: str) -> None:
    check_all(text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(JUNK, max_size=30).map("".join))
def test_property_fragment_soup(text: str) -> None:
    check_all(text)


def test_pathological_inputs_are_fast() -> None:
    import time

    start = time.perf_counter()
    for text in [
        "Region" + " " * 20000 + "x",
        "Score" + " " * 20000 + "x",
        "*" * 50000,
        "<think>" * 5000,
        "```" * 5000,
        "[" * 50000,
        "Score: " + "9" * 5000,
        "\n".join(["Score: 0.1"] * 5000),
    ]:
        check_all(text)
    assert time.perf_counter() - start < 10.0
