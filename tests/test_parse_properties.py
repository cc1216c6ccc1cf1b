"""Property suite for rewards/parse.py (issue 12): realistic and adversarial VLM answers.

Every public parser gets at least 2,000 generated answers and must keep the documented invariants:
no exception, a score that is None or finite in [-1, 1], region keys exactly the expected ids,
``ambiguous`` exactly when an ambiguity code is present (so an ambiguous answer is never reported as
plain ok) and never the internal-error code. Metamorphic properties check that junk inside a reason
never silently changes a well-formed answer's score.
"""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewards.parse as P
from rewards.parse import (
    AMBIGUITY_CODES,
    MAX_ID_DIGITS,
    W_CLAMPED,
    W_INTERNAL_ERROR,
    W_NO_SCORE,
    GroundingParse,
    RegionsParse,
    ScoreParse,
    parse_grounding_json,
    parse_regions_json,
    parse_regions_text,
    parse_score_json,
    parse_score_text,
)

KNOWN_CODES = {v for k, v in vars(P).items() if k.startswith("W_")}
MANY = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ invariants


def check_score(p: ScoreParse) -> None:
    assert isinstance(p, ScoreParse)
    assert W_INTERNAL_ERROR not in p.warnings
    assert len(set(p.warnings)) == len(p.warnings) and set(p.warnings) <= KNOWN_CODES
    assert (p.score is None) == (W_NO_SCORE in p.warnings)
    assert p.clamped == (W_CLAMPED in p.warnings)
    assert p.ambiguous == (not AMBIGUITY_CODES.isdisjoint(p.warnings))
    if p.score is None:
        assert not p.ambiguous and not p.clamped
    else:
        assert isinstance(p.score, float) and math.isfinite(p.score) and -1.0 <= p.score <= 1.0
        if p.clamped:
            assert p.score in (-1.0, 1.0)


def normalised(ids: list[object]) -> list[int]:
    """The documented normalisation of expected ids: integral, at most MAX_ID_DIGITS, distinct."""
    out: list[int] = []
    for i in ids:
        if isinstance(i, int) and not isinstance(i, bool) and abs(i) < 10**MAX_ID_DIGITS:
            out.append(i)
        elif isinstance(i, str) and i.strip().isascii() and i.strip().isdigit() and len(i.strip()) <= MAX_ID_DIGITS:
            out.append(int(i))
    return list(dict.fromkeys(out))


def check_regions(r: RegionsParse, ids: list[object]) -> None:
    assert isinstance(r, RegionsParse)
    assert list(r.regions) == normalised(ids)
    assert W_INTERNAL_ERROR not in r.warnings and set(r.warnings) <= KNOWN_CODES
    assert len(set(r.warnings)) == len(r.warnings)
    for p in r.regions.values():
        check_score(p)
        assert set(p.warnings) <= set(r.warnings)
    assert r.ambiguous == any(p.ambiguous for p in r.regions.values())


def check_grounding(g: GroundingParse, w: float, h: float) -> None:
    assert isinstance(g, GroundingParse)
    assert W_INTERNAL_ERROR not in g.warnings and set(g.warnings) <= KNOWN_CODES
    for b in g.boxes:
        x1, y1, x2, y2 = b.box
        assert all(math.isfinite(v) for v in b.box)
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h


# ------------------------------------------------------------------ strategies: pieces

PREFIXES = st.sampled_from(["", "", "", "- ", "* ", "### ", "> ", "1. ", "| ", "**", "__", "\ufeff", "\u200b", "\x00"])
NAMES = st.sampled_from(
    [
        "Score", "Score", "score", "SCORE", "Final Score", "Overall score", "Layout Score", "Global Layout Score",
        "Quality score", "Relevance score", "My score", "the score", "Score (0-10)", "Score (-1 to 1)",
        "Score [1-5]", "Score (out of 10)", "Region Score", "Scores",
    ]
)
CLOSERS = st.sampled_from(["", "", "**", "*", "__", "`"])
SEPS = st.sampled_from([":", ": ", ":  ", " =", "=", "\uff1a", ":**", ": **"])
MARKUP = st.sampled_from(["{}", "{}", "{}", "**{}**", "[{}]", "`{}`", "\n{}", "\n- {}", "\n* {}", "({})", '"{}"'])
TAILS = st.sampled_from(
    [
        "", "", "", ".", " (good)", " - solid", ", because it fits", " would be too high", " is not deserved",
        " on a scale of 0 to 10", " (0-10)", " points", " Reason: inline", "/10", " out of 10", "%", " 0.9", "x",
    ]
)
SPECIAL_NUMBERS = st.sampled_from(
    [
        "0.8", "-0.7", "+0.5", ".5", "-0.", "0,8", "-0,5", "1,000", "7", "10", "-10", "7/10", "8 out of 10",
        "0.8/1.0", "3/0", "80%", "1e400", "-1e400", "1e-3", "-" + "9" * 400, "9" * 320, "\u00bd", "-\u00bd",
        "0x10", "1_000", "1.2.3", "nan", "NaN", "inf", "-Infinity", "N/A", "\u22120.3", "\u2013 0.5", "- 0.5",
        "\uff10.\uff17", "<number between -1.0 and 1.0>", "0.8\u200b", "\u00b2", "\u0660.\u0668", "",
    ]
)
NUMBERS = st.one_of(
    SPECIAL_NUMBERS,
    st.integers(-10, 10).map(lambda t: f"{t / 10:.1f}"),
    st.floats(-1, 1, allow_nan=False).map(lambda x: f"{x:.2f}"),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.tuples(st.integers(-12, 12), st.sampled_from(["/", " / ", " out of ", "\u2044"]), st.integers(0, 100)).map(
        lambda t: f"{t[0]}{t[1]}{t[2]}"
    ),
)
JUNK = st.sampled_from(
    [
        "Score: 1", "Score: 1.0", "Final Score: 0.9", "> Score: 1", "Score=1", "score: 1.0 is not deserved",
        "unlike the example Score: 0.9 answer", "Region 2:", "region 2 of the field", "Region ID: 7",
        "Region ID: 1234567", "<think>", "</think>", "<think>x</think>", "{", "}", "[1, 2]", '{"score": 9}',
        '{"regions": [1]}', "```json", "```", "---", "\n", "\n\n", "**", "\u2212", "\u2013", "%", "/0", "0,8",
        "\u00bd", "\x07", "\ufeff", "\u200b", "\u2028", "\r", "\U0001f600", "Identified Object:", "Reason:",
        "Score:\n- 0.5", "Overall score: 0.95", "1e999", "nan",
    ]
)
WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz ABCDEFG.,;'()!?-0123456789", max_size=40)
REASONS = st.lists(st.one_of(WORDS, JUNK), max_size=5).map(" ".join)


@st.composite
def score_line(draw: st.DrawFn) -> str:
    label = draw(PREFIXES) + draw(NAMES) + draw(CLOSERS) + draw(SEPS)
    value = draw(MARKUP).format(draw(NUMBERS)) + draw(TAILS)
    return label + (" " if not label.endswith(" ") and draw(st.booleans()) else "") + value


@st.composite
def reason_line(draw: st.DrawFn) -> str:
    label = draw(st.sampled_from(["Reason", "**Reason:**", "Reasoning", "Justification", "Explanation", "reason"]))
    sep = "" if label.endswith(":**") else draw(st.sampled_from([":", ": ", "**:", " ="]))
    return f"{label}{sep} {draw(REASONS)}"


PREAMBLES = st.sampled_from(
    [
        "", "", "Sure! Here is my evaluation.\n\n", "<think>The layout looks fine. Score: 0.2 maybe?</think>\n",
        "Okay, let me look. Score: -0.3 seems harsh.\n</think>\n\n", "<think>Let me think about", "<thinking>",
        "Let me think.\n", "```\n", "> ",
    ]
)
ENDINGS = st.sampled_from(["", "", "\n", "\n\nLet me know if you need anything else!", "\n---\n", "</think>", "```"])


@st.composite
def text_answer(draw: st.DrawFn) -> str:
    lines = draw(st.lists(st.one_of(score_line(), reason_line(), JUNK, WORDS), min_size=1, max_size=6))
    return draw(PREAMBLES) + "\n".join(lines) + draw(ENDINGS)


JSON_LEAVES = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12), NUMBERS,
)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)
RAW_JSON_NUMBERS = st.sampled_from(["9" * 400, "-" + "9" * 400, "1e400", "NaN", "Infinity", "-0", "1.0", "7.0", "1E1"])


@st.composite
def json_object(draw: st.DrawFn) -> str:
    d = {draw(st.sampled_from(["score", "Score", "SCORE", " score "])): draw(JSON_VALUES)}
    if draw(st.booleans()):
        d["reason"] = draw(st.one_of(REASONS, JSON_VALUES))
    text = json.dumps(d, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):  # a number literal json.dumps cannot produce
        text = '{"score": ' + draw(RAW_JSON_NUMBERS) + ', "reason": "r"}'
    return text


@st.composite
def region_block(draw: st.DrawFn) -> str:
    rid = draw(st.one_of(st.integers(0, 6).map(str), st.sampled_from(["1234567", "12345678901", "\u00b2", "01", "x"])))
    header = draw(
        st.sampled_from(
            ["Region ID: {}", "Region {}:", "**Region ID: {}**", "### Region ID: {}", "Region #{}", "[Region ID: {}]",
             "region id: {}", "1. **Region {}**", "Region ID: {}, box [1, 2, 3, 4]", "region {} of the image"]
        )
    ).format(rid)
    obj = f"Identified Object: {draw(st.one_of(WORDS, JUNK))}"
    lines = [header, obj, draw(score_line()), draw(reason_line())]
    if draw(st.booleans()):
        lines = draw(st.permutations(lines))
    return "\n".join(lines) + draw(st.sampled_from(["\n---", "", "\n\n"]))


@st.composite
def regions_answer(draw: st.DrawFn) -> str:
    return draw(PREAMBLES) + "\n".join(draw(st.lists(region_block(), max_size=5))) + draw(ENDINGS)


@st.composite
def json_regions(draw: st.DrawFn) -> str:
    items = draw(
        st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"id": st.one_of(st.integers(-2, 8), st.sampled_from(["1", "2", "\u00b2", "1" * 12, 2.0, 1e300])),
                     "score": JSON_VALUES},
                    optional={"object": st.one_of(WORDS, JSON_VALUES), "reason": st.one_of(REASONS, JSON_VALUES)},
                ),
                JSON_VALUES,
            ),
            max_size=5,
        )
    )
    value = {"regions": items} if draw(st.booleans()) else items
    text = json.dumps(value)
    if draw(st.booleans()):
        text = text.replace("2.0", "9" * 350, 1).replace('"1"', "1" + "0" * 330, 1)
    return text


@st.composite
def grounding_answer(draw: st.DrawFn) -> str:
    coord = st.one_of(st.integers(-50, 300), st.floats(allow_nan=False), st.sampled_from(["x", None, True]))
    item = st.fixed_dictionaries(
        {draw(st.sampled_from(["box", "bbox_2d", "bbox", "Box"])): st.lists(coord, min_size=3, max_size=5)},
        optional={"label": st.one_of(WORDS, JSON_VALUES)},
    )
    text = json.dumps(draw(st.one_of(st.lists(item, max_size=4), st.dictionaries(st.just("objects"), st.lists(item, max_size=3)))))
    if draw(st.booleans()):
        text = text.replace("1", "9" * 320, 1)
    return text


@st.composite
def wrapped(draw: st.DrawFn, inner: st.SearchStrategy[str]) -> str:
    """A JSON answer as VLMs send it: bare, fenced, with prose, or inside think tags."""
    body = draw(inner)
    form = draw(st.sampled_from(["@", "```json\n@\n```", "Here you go:\n@ Hope that helps.", "Looking at [1, 2].\n@",
                                 "<think>@</think>@", "<think>@", "@ </think>", '{"a": "<think>"} @']))
    return form.replace("@", body)


@st.composite
def mutated(draw: st.DrawFn, inner: st.SearchStrategy[str]) -> str:
    text = draw(inner)
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 12)))
        op = draw(st.sampled_from(["insert", "delete", "repeat"]))
        if op == "insert":
            text = text[:i] + draw(st.one_of(JUNK, st.text(max_size=6))) + text[i:]
        elif op == "delete":
            text = text[:i] + text[j:]
        else:
            text = text[:i] + text[i:j] * draw(st.integers(2, 4)) + text[j:]
    return text


ANY_JSON = st.one_of(json_object(), json_regions(), grounding_answer())
ANSWERS = st.one_of(
    mutated(text_answer()),
    mutated(regions_answer()),
    mutated(wrapped(ANY_JSON)),
    st.lists(st.one_of(JUNK, WORDS, NUMBERS), max_size=12).map("".join),
    st.text(max_size=200),
)
IDS = st.one_of(
    st.lists(st.integers(1, 6), max_size=5),
    st.lists(st.one_of(st.integers(-3, 10**10), st.sampled_from(["1", "2", "x", "\u00b2", "1" * 12])), max_size=5),
)

# ------------------------------------------------------------------ invariants, 2,000 answers each


@MANY
@given(st.one_of(ANSWERS, mutated(text_answer())))
def test_parse_score_text_invariants(text: str) -> None:
    check_score(parse_score_text(text))


@MANY
@given(st.one_of(ANSWERS, mutated(wrapped(json_object()))))
def test_parse_score_json_invariants(text: str) -> None:
    check_score(parse_score_json(text))


@MANY
@given(st.one_of(ANSWERS, mutated(regions_answer())), IDS)
def test_parse_regions_text_invariants(text: str, ids: list[object]) -> None:
    check_regions(parse_regions_text(text, ids), ids)


@MANY
@given(st.one_of(ANSWERS, mutated(wrapped(json_regions()))), IDS)
def test_parse_regions_json_invariants(text: str, ids: list[object]) -> None:
    check_regions(parse_regions_json(text, ids), ids)


@MANY
@given(st.one_of(ANSWERS, mutated(wrapped(grounding_answer()))), st.integers(1, 400), st.integers(1, 400))
def test_parse_grounding_json_invariants(text: str, w: int, h: int) -> None:
    check_grounding(parse_grounding_json(text, w, h), w, h)


def test_non_text_and_bad_arguments_never_raise() -> None:
    for bad in (None, 3, b"Score: 1", ["Score: 1"], object()):
        check_score(parse_score_text(bad))
        check_score(parse_score_json(bad))
        check_regions(parse_regions_text(bad, [1]), [1])
        check_regions(parse_regions_json(bad, [1]), [1])
        check_grounding(parse_grounding_json(bad, 8, 8), 8, 8)
    for ids in (None, 3, "12", [None, 1.5, True]):
        assert parse_regions_text("Region ID: 1\nScore: 0.5", ids).warnings[0] == P.W_BAD_ARGUMENT  # type: ignore[arg-type]
    assert parse_grounding_json("[]", "wide", float("nan")).warnings == (P.W_BAD_ARGUMENT,)  # type: ignore[arg-type]


# ------------------------------------------------------------------ metamorphic: junk never silently wins

TENTHS_ST = st.integers(-10, 10)


@SOME
@given(TENTHS_ST, REASONS, st.sampled_from(["Score: {}", "**Score:** {}", "- **Score**: {}", "Score (-1 to 1): {}"]))
def test_reason_junk_never_silently_changes_the_score(t: int, reason: str, line: str) -> None:
    """A well-formed score line followed by any reason: the score is the written one, or ambiguous."""
    reason = reason.replace("<think", "<th").replace("</think", "</th")  # think tags are a separate rule
    p = parse_score_text(line.format(f"{t / 10:.1f}") + "\nReason: " + reason)
    check_score(p)
    assert p.score == t / 10 or p.ambiguous


@SOME
@given(TENTHS_ST, st.one_of(REASONS, JSON_VALUES), st.booleans())
def test_json_reason_cannot_change_the_score(t: int, reason: object, fenced: bool) -> None:
    text = json.dumps({"score": t, "reason": reason})
    p = parse_score_json(f"```json\n{text}\n```" if fenced else text)
    check_score(p)
    assert p.score == t / 10 and not p.ambiguous


@SOME
@given(st.lists(st.tuples(TENTHS_ST, st.one_of(WORDS, JUNK), REASONS), min_size=1, max_size=4))
def test_region_junk_never_silently_moves_a_score(entries: list[tuple[int, str, str]]) -> None:
    """Each region's score is its own, missing, or flagged ambiguous: never another region's, silently."""
    blocks = [
        f"Region ID: {k}\nIdentified Object: {obj}\nScore: {t / 10:.1f}\nReason: {reason}\n---"
        for k, (t, obj, reason) in enumerate(entries, start=1)
    ]
    text = "\n".join(blocks).replace("<think", "<th").replace("</think", "</th")
    ids = list(range(1, len(entries) + 1))
    r = parse_regions_text(text, ids)
    check_regions(r, ids)
    for k, (t, _, _) in enumerate(entries, start=1):
        p = r.regions[k]
        assert p.score is None or p.score == t / 10 or p.ambiguous


@settings(max_examples=200, deadline=None)
@given(TENTHS_ST, st.text(alphabet="abcdefghij .,", min_size=1, max_size=30).filter(str.strip))
def test_modes_agree_on_scale_whatever_the_form(t: int, reason: str) -> None:
    """One tenths value: JSON int, float and string, and text-mode decimals all read the same."""
    expected = t / 10
    for answer in (f'{{"score": {t}, "reason": "{reason}"}}', f'{{"score": "{t}", "reason": "{reason}"}}'):
        p = parse_score_json(answer)
        assert (p.score, p.ambiguous) == (expected, False)
    floats = parse_score_json(f'{{"score": {t}.0, "reason": "{reason}"}}')
    assert floats.score == expected and floats.ambiguous == (abs(t) == 1)  # "1.0" may mean 1.0
    line = f"Score: {expected:.1f}\nReason: {reason}"
    text_mode = parse_score_text(line)
    assert text_mode.score == expected and not text_mode.ambiguous
    json_mode = parse_score_json(line)  # JSON mode reading text lines: still the tenths prompt
    if abs(t) == 10:  # "1.0" under a tenths prompt is 1 tenth, but may mean 1.0
        assert json_mode.score == expected / 10 and json_mode.ambiguous
    else:
        assert json_mode.score == expected and not json_mode.ambiguous
    as_json = parse_score_text(f'{{"score": {expected}, "reason": "{reason}"}}')  # text mode, JSON form
    assert as_json.score == expected and not as_json.ambiguous
