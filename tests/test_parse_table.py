"""Table of the answer classes of issue 12 ("no silent wrong scores"), several variants each.

Every row states the exact result: the score (or None), the ambiguous flag, and the warning codes
that must be present (``codes``) or absent (``absent``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from rewards.parse import (
    MAX_INPUT_CHARS,
    W_AMBIGUOUS_NUMBER,
    W_AMBIGUOUS_SCORES,
    W_BAD_BOX,
    W_BAD_JSON,
    W_BAD_NUMBER,
    W_CLAMPED,
    W_DECIMAL_COMMA,
    W_DUPLICATE_REGION,
    W_FRACTION,
    W_INTERNAL_ERROR,
    W_JSON_ANSWER,
    W_MISSING_REGION,
    W_MULTIPLE_SCORES,
    W_NO_SCORE,
    W_OTHER_SCALE,
    W_PROSE_SCORE,
    W_TRUNCATED,
    W_TRUNCATED_THINK,
    W_UNCLOSED_THINK,
    W_UNKNOWN_REGION,
    ScoreParse,
    parse_grounding_json,
    parse_regions_json,
    parse_regions_text,
    parse_score_json,
    parse_score_text,
)

PARSERS = {"text": parse_score_text, "json": parse_score_json}


@dataclass(frozen=True)
class Case:
    name: str
    mode: str  # text / json
    answer: str
    score: float | None
    ambiguous: bool = False
    codes: frozenset[str] = field(default_factory=frozenset)
    absent: frozenset[str] = field(default_factory=frozenset)
    reason: str | None = None


def case(name: str, mode: str, answer: str, score: float | None, ambiguous: bool = False, *codes: str,
         absent: tuple[str, ...] = (), reason: str | None = None) -> Case:
    return Case(name, mode, answer, score, ambiguous, frozenset(codes), frozenset(absent), reason)


SCORE_CASES = [
    # --- A: a number inside the reason must not override the score
    case("A reason mid-line example", "text", "Score: 0.3\nReason: unlike the example Score: 0.9 answer, it is weak.",
         0.3, False, absent=(W_MULTIPLE_SCORES,), reason="unlike the example Score: 0.9 answer, it is weak."),
    case("A reason wrapped prose label", "text", "Score: 0.3\nReason: the cat is small, so\nthe score: 1.0 is not deserved.",
         0.3, False, absent=(W_MULTIPLE_SCORES,), reason="the cat is small, so\nthe score: 1.0 is not deserved."),
    case("A reason quoted line", "text", "Score: 0.3\nReason: the rubric reads\n> Score: 1\nfor flawless images only.",
         0.3, False, reason="the rubric reads\n> Score: 1\nfor flawless images only."),
    case("A reason mid-line clean value", "text", "Score: 0.3\nReason: I would never write Score: 1.", 0.3),
    case("A reason Score=1", "text", "Score: 0.3\nReason: I would not give Score=1 here.", 0.3, False,
         reason="I would not give Score=1 here."),
    case("A reason Final prose", "text", "Score: 0.3\nReason: not perfect; a\nFinal Score: 1.0 would be wrong.", 0.3),
    case("A reason Overall mid-line", "text", "Score: 0.3\nReason: fine. Overall Score: 0.9 is too high.", 0.3),
    case("A reason bullet prose", "text", "Score: -0.2\nReason: off-centre\n- Score: 1.0 needs a perfect layout", -0.2),
    case("A inline after reason", "text", "Score: 0.2 Reason: ok, but Score: 0.9 for the colours", 0.2),
    case("A clean rival line is flagged", "text", "Score: 0.3\nReason: hmm\nScore: 1.0", 1.0, True, W_AMBIGUOUS_SCORES),
    case("A Final disagrees", "text", "Score: 0.3\nReason: x\nFinal Score: 0.9", 0.9, True, W_AMBIGUOUS_SCORES),
    case("A sub-scores are parts", "text", "Quality score: 0.2\nOverall score: 0.6\nReason: x", 0.6, False,
         W_MULTIPLE_SCORES),
    case("A same value repeated", "text", "Score: 0.5\nReason: x\nScore: 0.5", 0.5, False, W_MULTIPLE_SCORES),
    case("A only prose", "text", "Score: 0.9 would be too high since the dog is missing", 0.9, True, W_PROSE_SCORE),
    case("A JSON reason label", "json", '{"score": -3, "reason": "Score: 1.0 would need a perfect image"}', -0.3),
    # --- B: other scales never become the maximum silently
    case("B label range 0-10", "text", "Score (0-10): 3\nReason: x", -0.4, True, W_OTHER_SCALE, absent=(W_CLAMPED,)),
    case("B fraction 2/10", "text", "Score: 2/10\nReason: x", 0.2, True, W_OTHER_SCALE, W_FRACTION),
    case("B out of 10", "text", "Score: 7 out of 10", 0.7, True, W_OTHER_SCALE, W_FRACTION),
    case("B bold fraction", "text", "Score: **8**/10", 0.8, True, W_OTHER_SCALE, W_FRACTION),
    case("B trailing range", "text", "Score: 3 (on a 0-10 scale)", -0.4, True, W_OTHER_SCALE),
    case("B trailing scale words", "text", "Score: 7 on a scale of 0 to 10", 0.4, True, W_OTHER_SCALE),
    case("B label out of", "text", "Score (out of 10): 7", 0.7, True, W_OTHER_SCALE),
    case("B label 1-5", "text", "Score (1-5): 4", 0.5, True, W_OTHER_SCALE),
    case("B bracket label", "text", "Score [0-100]: 75", 0.5, True, W_OTHER_SCALE),
    case("B bare 7", "text", "Score: 7\nReason: x", 0.7, True, W_OTHER_SCALE, absent=(W_CLAMPED,)),
    case("B bare 85", "text", "Score: 85", 1.0, True, W_OTHER_SCALE, W_CLAMPED),
    case("B huge literal", "text", "Score: 1e400", 1.0, True, W_CLAMPED),
    case("B outside its own range", "text", "Score (-1 to 1): 1.5", 1.0, True, W_CLAMPED),
    case("B unit range is the prompt's", "text", "Score (from -1.0 to 1.0): -0.8", -0.8, False),
    case("B unit fraction", "text", "Score: 0.8/1.0", 0.8, False, W_FRACTION),
    case("B tenths range is exact", "text", "Score (-10 to 10): 7", 0.7, False),
    case("B JSON mode fraction", "json", "Score: 8/10\nReason: x", 0.8, True, W_OTHER_SCALE, W_BAD_JSON),
    case("B JSON out of range", "json", '{"score": 15, "reason": "x"}', 1.0, True, W_CLAMPED),
    # --- C: locale and typography
    case("C decimal comma", "text", "Score: 0,8\nReason: x", 0.8, False, W_DECIMAL_COMMA),
    case("C negative decimal comma", "text", "Score: -0,5", -0.5, False, W_DECIMAL_COMMA),
    case("C JSON string decimal comma", "json", '{"score": "0,7", "reason": "x"}', 0.7, False, W_DECIMAL_COMMA),
    case("C thousands or decimal", "text", "Score: 1,000", 1.0, True, W_AMBIGUOUS_NUMBER),
    case("C bullet minus", "text", "Score:\n- 0.5\nReason: x", 0.5, True, W_AMBIGUOUS_NUMBER),
    case("C detached minus", "text", "Score: - 0.5", -0.5, True, W_AMBIGUOUS_NUMBER),
    case("C detached en dash", "text", "Score: \u2013 0.5", -0.5, True, W_AMBIGUOUS_NUMBER),
    case("C bullet then minus", "text", "Score:\n- -0.5\nReason: x", -0.5, False),
    case("C star bullet", "text", "Score:\n* 0.5\nReason: x", 0.5, False),
    case("C split number", "text", "Score: 0. 5", 0.0, True, W_AMBIGUOUS_NUMBER),
    case("C vulgar half", "text", "Score: \u00bd", 0.5, False, W_FRACTION),
    case("C negative half", "text", "Score: -\u00bd\nReason: x", -0.5, False, W_FRACTION),
    case("C hex", "text", "Score: 0x10", None, False, W_BAD_NUMBER),
    case("C underscore", "text", "Score: 1_000", None, False, W_BAD_NUMBER),
    case("C two points", "text", "Score: 1.2.3", None, False, W_BAD_NUMBER),
    case("C glued unit", "text", "Score: 0.8pts", None, False, W_BAD_NUMBER),
    case("C NUL before label", "text", "\x00Score: 0.5\nReason: x", 0.5),
    case("C BOM", "text", "\ufeffScore: 0.5\nReason: x", 0.5),
    case("C zero-width space", "text", "Sure.\n\u200b\u200bScore: 0.5\nReason: x", 0.5),
    case("C zero-width in label", "text", "Sc\u200bore: 0.5\nReason: x", 0.5),
    case("C soft hyphen", "text", "Sc\u00adore\u00ad: 0.5", 0.5),
    case("C escape char", "text", "\x1b[1mScore: 0.5", 0.5),
    case("C bidi mark", "text", "\u202bScore: \u22120.5", -0.5),
    case("C bell after colon", "text", "Score:\x07 0.5", 0.5),
    case("C CRLF", "text", "Score: 0.5\r\nReason: x\r\n", 0.5, reason="x"),
    case("C line separator", "text", "Score: 0.5\u2028Reason: x", 0.5, reason="x"),
    case("C full width", "text", "Score\uff1a\uff10.\uff17", 0.7),
    # --- D: truncated thinking is no confident score
    case("D truncated mid-sentence", "text", "<think>Score: 0.9 would be too high since", 0.9, True, W_TRUNCATED_THINK,
         W_UNCLOSED_THINK, W_PROSE_SCORE),
    case("D answer inside unclosed think", "text", "<think>The dog is left.\nScore: 0.7\nReason: ok", 0.7, True,
         W_TRUNCATED_THINK),
    case("D answer before unclosed think", "text", "Score: 0.4\nReason: ok\n<think>Score: 0.9", 0.4, False,
         W_UNCLOSED_THINK, absent=(W_TRUNCATED_THINK,)),
    case("D thinking only", "text", "<think>\nLet me look at the layout", None, False, W_UNCLOSED_THINK, W_NO_SCORE),
    case("D JSON inside unclosed think", "json", '<think>{"score": 9, "reason": "x"}', 0.9, True, W_TRUNCATED_THINK),
    case("D closed think is dropped", "json", '<think>{"score": 9}</think>{"score": 3, "reason": "ok"}', 0.3),
    # --- E: JSON mode: one scale whatever the type; both modes read both forms
    case("E int 1", "json", '{"score": 1, "reason": "x"}', 0.1),
    case("E float 1.0", "json", '{"score": 1.0, "reason": "x"}', 0.1, True, W_OTHER_SCALE),
    case("E string 1", "json", '{"score": "1", "reason": "x"}', 0.1),
    case("E int 7", "json", '{"score": 7, "reason": "x"}', 0.7),
    case("E string 7", "json", '{"score": "7", "reason": "x"}', 0.7),
    case("E float 7.0", "json", '{"score": 7.0, "reason": "x"}', 0.7),
    case("E unit float", "json", '{"score": 0.7, "reason": "x"}', 0.7),
    case("E unit string", "json", '{"score": "-0.7", "reason": "x"}', -0.7),
    case("E repeated key", "json", '{"score": 1, "score": 9, "reason": "x"}', 0.9, True, W_AMBIGUOUS_SCORES),
    case("E think tag in a string", "json", '{"score": 5, "reason": "uses <think> tags"}', 0.5,
         absent=(W_UNCLOSED_THINK,), reason="uses <think> tags"),
    case("E closing tag in a string", "json", '{"score": 5, "reason": "a </think> b"}', 0.5, reason="a </think> b"),
    case("E think block in a string", "json", '{"score": 5, "reason": "<think>x</think> y"}', 0.5,
         reason="<think>x</think> y"),
    case("E text mode reads JSON", "text", '{"score": 0.7, "reason": "ok"}', 0.7, False, W_JSON_ANSWER),
    case("E text mode JSON tenths", "text", '{"score": 7, "reason": "ok"}', 0.7, True, W_JSON_ANSWER, W_OTHER_SCALE),
    case("E text mode JSON fenced", "text", 'Here:\n```json\n{"score": -0.5, "reason": "ok"}\n```', -0.5, False,
         W_JSON_ANSWER),
    case("E JSON mode reads text", "json", "Score: 0.4\nReason: ok", 0.4, False, W_BAD_JSON),
    case("E JSON mode text tenths", "json", "**Score:** 7\nReason: ok", 0.7, False, W_BAD_JSON),
    case("E NaN", "json", '{"score": NaN, "reason": "x"}', None, False, W_NO_SCORE),
    # --- G: crash paths: overflow-safe, never the internal-error branch
    case("G 400-digit JSON int", "json", '{"score": ' + "9" * 400 + ', "reason": "x"}', 1.0, True, W_CLAMPED),
    case("G 400-digit negative", "json", '{"score": -' + "9" * 400 + ', "reason": "x"}', -1.0, True, W_CLAMPED),
    case("G 5000-digit JSON int", "json", '{"score": ' + "9" * 5000 + "}", 1.0, True, W_CLAMPED),
    case("G 400-digit in text mode JSON", "text", '{"score": ' + "9" * 400 + "}", 1.0, True, W_CLAMPED, W_OTHER_SCALE),
    case("G 5000-digit text literal", "text", "Score: " + "9" * 5000, 1.0, True, W_CLAMPED),
    case("G huge exponent in JSON", "json", '{"score": 1e400, "reason": "x"}', 1.0, True, W_CLAMPED),
    # --- the judge's own format (shapes.judge, the prompts' examples): plain ok
    case("ok shapes text", "text", "Score: 0.90\nReason: The red circle is left of the blue square, as asked.", 0.9,
         reason="The red circle is left of the blue square, as asked."),
    case("ok shapes negative", "text", "Score: -0.60\nReason: The prompt does not ask for a green square.", -0.6),
    case("ok shapes json", "json", '{"score": -6, "reason": "The prompt does not ask for a green square."}', -0.6),
    case("ok reason first", "text", "Reason: The cat is left of the dog.\nScore: 0.8", 0.8),
]


@pytest.mark.parametrize("c", SCORE_CASES, ids=[c.name for c in SCORE_CASES])
def test_score_cases(c: Case) -> None:
    p = PARSERS[c.mode](c.answer)
    assert isinstance(p, ScoreParse) and W_INTERNAL_ERROR not in p.warnings
    assert p.score == c.score, p.warnings
    assert p.ambiguous == c.ambiguous, p.warnings
    assert c.codes <= set(p.warnings), p.warnings
    assert not (c.absent & set(p.warnings)), p.warnings
    if c.reason is not None:
        assert p.reason == c.reason
    if not c.ambiguous and c.score is not None and not c.codes:
        assert set(p.warnings) <= {"no_reason"}  # the plain-ok rows carry no other code


# --- F: region blocks, and regions in every form

BLOCKS = "Region ID: 1\nIdentified Object: a dog\nScore: 0.5\nReason: a\n---\nRegion ID: 2\nScore: -0.5\nReason: b\n---"


@dataclass(frozen=True)
class RegionCase:
    name: str
    parser: str  # text / json
    answer: str
    ids: tuple[int, ...]
    scores: dict[int, tuple[float | None, bool]]  # id -> (score, ambiguous)
    codes: frozenset[str] = frozenset()


def rcase(name: str, parser: str, answer: str, ids: tuple[int, ...], scores: dict[int, tuple[float | None, bool]],
          *codes: str) -> RegionCase:
    return RegionCase(name, parser, answer, ids, scores, frozenset(codes))


REGION_CASES = [
    rcase("F object name wraps to 'region 2'", "text",
          "Region ID: 1\nIdentified Object: a dog standing in the\nregion 2 of the field\nScore: 0.5\nReason: a\n"
          "Region ID: 2\nScore: -0.5\nReason: b", (1, 2), {1: (0.5, False), 2: (-0.5, False)}),
    rcase("F reason line 'Region 2,'", "text",
          "Region ID: 1\nScore: 0.5\nReason: it overlaps\nRegion 2, which is blurry.\nRegion ID: 2\nScore: -0.5\nReason: b",
          (1, 2), {1: (0.5, False), 2: (-0.5, False)}),
    rcase("F reason line 'region 2 is'", "text",
          "Region 1:\nScore: 0.5\nReason: same as\nregion 2 is also fine\nRegion 2:\nScore: 0.1\nReason: b",
          (1, 2), {1: (0.5, False), 2: (0.1, False)}),
    rcase("F reason 'Region ID 2 for'", "text",
          "Region ID: 1\nScore: 0.5\nReason: see\nRegion ID 2 for the tail\nRegion ID: 2\nScore: 0.1\nReason: b",
          (1, 2), {1: (0.5, False), 2: (0.1, False)}),
    rcase("F 7-digit id is not 6 digits", "text", "Region ID: 1234567\nScore: 0.5\nReason: x", (123456,),
          {123456: (None, False)}, W_UNKNOWN_REGION, W_MISSING_REGION),
    rcase("F 7-digit id read whole", "text", "Region ID: 1234567\nScore: 0.5\nReason: x", (1234567,),
          {1234567: (0.5, False)}),
    rcase("F too long id", "text", "Region ID: 12345678901\nScore: 0.5\nReason: x\nRegion ID: 1\nScore: 0.2",
          (1,), {1: (0.2, False)}, W_UNKNOWN_REGION),
    rcase("F 5000-digit id", "text", "Region ID: " + "1" * 5000 + "\nScore: 0.5", (1,), {1: (None, False)},
          W_UNKNOWN_REGION),
    rcase("F header variants stay headers", "text",
          "**Region 1** (the dog):\nScore: 0.5\nReason: a\n### Region ID: 2 - tree\nScore: 0.1\nReason: b",
          (1, 2), {1: (0.5, False), 2: (0.1, False)}),
    rcase("F duplicates disagree", "text", BLOCKS + "\nRegion ID: 1\nScore: 0.9\nReason: again", (1, 2),
          {1: (0.5, True), 2: (-0.5, False)}, W_DUPLICATE_REGION, W_AMBIGUOUS_SCORES),
    rcase("F reason number in a region", "text", "Region ID: 1\nScore: -0.5\nReason: unlike Score: 1.0 elsewhere",
          (1,), {1: (-0.5, False)}),
    rcase("F other scale in a region", "text", "Region ID: 1\nScore: 8/10\nReason: x", (1,), {1: (0.8, True)},
          W_OTHER_SCALE),
    rcase("D region inside unclosed think", "text", "<think>Region ID: 1\nScore: 0.5\nReason: x", (1, 2),
          {1: (0.5, True), 2: (None, False)}, W_TRUNCATED_THINK, W_UNCLOSED_THINK),
    rcase("E text mode reads JSON regions", "text",
          '{"regions": [{"id": 1, "score": 0.5, "reason": "a"}, {"id": 2, "score": -0.5, "reason": "b"}]}',
          (1, 2), {1: (0.5, False), 2: (-0.5, False)}, W_JSON_ANSWER),
    rcase("E stray list before JSON regions", "json",
          'Looking at [1, 2].\n{"regions": [{"id": 1, "score": 5, "reason": "a"}, {"id": 2, "score": -5, "reason": "b"}]}',
          (1, 2), {1: (0.5, False), 2: (-0.5, False)}),
    rcase("E stray list before text regions", "json", "Looking at regions [1, 2].\n" + BLOCKS, (1, 2),
          {1: (0.5, False), 2: (-0.5, False)}, W_BAD_JSON),
    rcase("E list of numbers is no answer", "json", "[1, 2]\n" + BLOCKS, (1, 2), {1: (0.5, False), 2: (-0.5, False)},
          W_BAD_JSON),
    rcase("E JSON mode reads text blocks", "json", BLOCKS, (1, 2), {1: (0.5, False), 2: (-0.5, False)}, W_BAD_JSON),
    rcase("G superscript id", "json", '{"regions": [{"id": "\\u00b2", "score": 3, "reason": "a"}]}', (2,),
          {2: (None, False)}, W_UNKNOWN_REGION, W_MISSING_REGION),
    rcase("G Arabic-Indic id", "json", '{"regions": [{"id": "\\u0662", "score": 3, "reason": "a"}]}', (2,),
          {2: (None, False)}, W_UNKNOWN_REGION),
    rcase("G 400-digit id", "json", '{"regions": [{"id": ' + "1" * 400 + ', "score": 3, "reason": "a"}]}', (1,),
          {1: (None, False)}, W_UNKNOWN_REGION),
    rcase("G 400-digit score wipes only its region", "json",
          '{"regions": [{"id": 1, "score": ' + "9" * 400 + ', "reason": "a"}, {"id": 2, "score": 3, "reason": "b"}]}',
          (1, 2), {1: (1.0, True), 2: (0.3, False)}, W_CLAMPED),
    rcase("ok shapes blocks", "text",
          "Region ID: 1\nIdentified Object: a red circle\nScore: 0.90\nReason: The red circle the prompt asks for.\n---\n"
          "Region ID: 2\nIdentified Object: a green square\nScore: -0.60\nReason: The prompt does not ask for a green "
          "square.\n---", (1, 2), {1: (0.9, False), 2: (-0.6, False)}),
]

RPARSERS = {"text": parse_regions_text, "json": parse_regions_json}


@pytest.mark.parametrize("c", REGION_CASES, ids=[c.name for c in REGION_CASES])
def test_region_cases(c: RegionCase) -> None:
    r = RPARSERS[c.parser](c.answer, list(c.ids))
    assert list(r.regions) == list(c.ids) and W_INTERNAL_ERROR not in r.warnings
    assert {k: (p.score, p.ambiguous) for k, p in r.regions.items()} == c.scores, r.warnings
    assert r.ambiguous == any(a for _, a in c.scores.values())
    assert c.codes <= set(r.warnings), r.warnings
    if not c.codes:
        assert r.warnings == ()


def test_fallback_truncates_once() -> None:
    """Long answers: one truncation (keeping the tail), then the JSON -> text fallback."""
    long = "x" * (MAX_INPUT_CHARS + 50) + "\n" + BLOCKS
    r = parse_regions_json(long, [1, 2])
    assert (r.regions[1].score, r.regions[2].score) == (0.5, -0.5)
    assert r.warnings.count(W_TRUNCATED) == 1 and W_BAD_JSON in r.warnings
    expanding = "\ufdfa" * 8_000 + "\n" + BLOCKS  # NFKC makes it 18 times longer
    r = parse_regions_json(expanding, [1, 2])
    assert (r.regions[1].score, r.regions[2].score) == (0.5, -0.5) and r.warnings.count(W_TRUNCATED) == 1


def test_grounding_crash_paths() -> None:
    big = "9" * 400
    g = parse_grounding_json(f'[{{"label": "a", "box": [{big}, 1, 2, 3]}}, {{"label": "b", "box": [1, 2, 30, 40]}}]', 64, 64)
    assert [(b.label, b.box) for b in g.boxes] == [("b", (1.0, 2.0, 30.0, 40.0))] and g.warnings == (W_BAD_BOX,)
    g = parse_grounding_json('[{"label": "a", "box": [' + "1" * 5000 + ", 1, 2, 3]}]", 64, 64)
    assert g.boxes == () and W_INTERNAL_ERROR not in g.warnings
    g = parse_grounding_json('Looking at [1, 2]. [{"label": "b", "box": [1, 2, 30, 40]}]', 64, 64)
    assert [b.label for b in g.boxes] == ["b"] and g.warnings == ()
    assert parse_grounding_json("Nothing: []", 8, 8).warnings == ()
