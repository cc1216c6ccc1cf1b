"""Parse judge answers into typed scores. No function here raises, whatever the input.

Text answers follow the format the prompts in :mod:`rewards.prompts` ask for (``Score:`` /
``Reason:`` lines, per region under ``Region ID: k`` with ``Identified Object:``), but real VLM
output is messier, so the parser also accepts:

* ``<think>...</think>`` blocks (dropped); a stray ``</think>`` (everything before it is dropped,
  as when the chat template opened the block); an unclosed ``<think>`` (the tag is removed and the
  text is parsed anyway, flagged :data:`W_UNCLOSED_THINK`).
* markdown: ``**Score:** 0.8``, ``*Score*: 0.8``, ``__Score__``, ``### Region ID: 2``, bullets,
  numbered lists, a number on the line after its label, ``Score: [0.8]``.
* unicode minus / en dash before a digit, leading ``+``, integers, ``.5``, ``-0.``, NFKC forms
  (full-width digits and colons).

Decisions (tests pin each of them):

* **Reason** (and Identified Object) run to the next field, a blank line or a ``---`` line.
* **Several scores.** Labels rank ``Final/Overall/Total Score`` > ``Score`` (also ``Global Layout
  Score``, ...) > sub-scores such as ``Quality Score``; within the best rank the *last* one wins
  (the model's latest word, after self-corrections). More than one numeric score adds
  :data:`W_MULTIPLE_SCORES`. The reason is the first ``Reason:`` after the chosen score (else the
  last one before it).
* **Range.** Text scores are read on the [-1, 1] scale; anything outside is clamped
  (``clamped=True``, :data:`W_CLAMPED`). No scale is guessed in text mode: ``Score: 7`` is 1.0.
* **Fractions.** ``a/b`` and ``a out of b`` mean a÷b (``7/10`` -> 0.7, ``0.8/1.0`` -> 0.8),
  flagged :data:`W_FRACTION`; a zero denominator gives no score.
* **Percentages** (``80%``) give no score (:data:`W_PERCENT`): it is unclear where 0 % sits on a
  signed scale.
* ``nan``/``inf`` words give no score (:data:`W_NONFINITE`); a numeric literal too large for a
  float (``1e999``) is a finite number out of range and is clamped.
* **JSON.** Integers are tenths, as the schema says (``7`` -> 0.7, ``1`` -> 0.1, ``-10`` -> -1.0,
  larger magnitudes are clamped); floats are already on the [-1, 1] scale (``0.7``); strings use
  the text rules. Code fences and prose around the object are tolerated. When no usable JSON is
  found the answer is flagged :data:`W_BAD_JSON` and parsed with the text parser instead.
* **Regions.** Every expected id gets an entry (score None + :data:`W_MISSING_REGION` when absent).
  For an id with several blocks the first block *with a score* wins (a restated header without a
  score is no duplicate); :data:`W_DUPLICATE_REGION` when two blocks carry scores. Unknown ids are
  ignored (:data:`W_UNKNOWN_REGION`). With one expected id and no header at all, the whole answer
  is read as that region (:data:`W_NO_REGION_HEADER`).

Not handled (no score, never a guess): markdown tables, scores only in prose ("a score of 0.8").

Invariants: ``score is None`` iff :data:`W_NO_SCORE` is in ``warnings``; ``clamped`` iff
:data:`W_CLAMPED` is; scores are finite and in [-1, 1]; warnings are distinct codes in order of
first occurrence. The top-level ``RegionsParse.warnings`` is the union over all regions plus the
answer-level codes.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

W_NOT_TEXT = "not_text"  # input was not a str
W_EMPTY = "empty"  # nothing left after stripping think blocks / whitespace
W_TRUNCATED = "truncated"  # input longer than MAX_INPUT_CHARS; only the tail was parsed
W_UNCLOSED_THINK = "unclosed_think"  # a <think> without </think>
W_NO_SCORE = "no_score"  # no usable score
W_NONFINITE = "nonfinite"  # nan / inf / x/0
W_PERCENT = "percent"  # a percentage where a score was expected
W_FRACTION = "fraction"  # score given as a/b or "a out of b"
W_CLAMPED = "clamped"  # score outside [-1, 1], clamped
W_MULTIPLE_SCORES = "multiple_scores"  # several numeric scores; see module docstring
W_NO_REASON = "no_reason"  # no Reason field
W_MISSING_REGION = "missing_region"
W_DUPLICATE_REGION = "duplicate_region"
W_UNKNOWN_REGION = "unknown_region"
W_NO_REGION_HEADER = "no_region_header"
W_BAD_JSON = "bad_json"  # no usable JSON; the text parser was used instead
W_BAD_SCORE_TYPE = "bad_score_type"  # JSON score of a type that is no number (bool, list, ...)
W_BAD_BOX = "bad_box"  # grounding: a box that is not 4 finite numbers or is empty
W_INTERNAL_ERROR = "internal_error"  # a bug in this module; never expected (tests check)

MAX_INPUT_CHARS = 100_000
MAX_REASON_CHARS = 2_000
MAX_OBJECT_CHARS = 200
_MAX_JSON_ATTEMPTS = 64


class ScoreParse(BaseModel):
    """One parsed score (global, sample-level, or one region)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    score: float | None = Field(description="score in [-1, 1], or None when none could be read")
    reason: str = Field("", description="the judge's justification ('' when absent)")
    identified_object: str | None = Field(None, description="region answers: the object the judge named")
    warnings: tuple[str, ...] = Field((), description="warning codes (W_* constants), distinct")
    clamped: bool = Field(False, description="the raw score was outside [-1, 1] and was clamped")


class RegionsParse(BaseModel):
    """Parsed region answer: one entry per expected id, in the order of the expected ids."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    regions: dict[int, ScoreParse] = Field(description="expected region id -> its parse")
    warnings: tuple[str, ...] = Field((), description="answer-level codes plus the union of the regions'")


class GroundedBox(BaseModel):
    """One object located by the judge (grounding answer)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    label: str = Field(description="the object's label as written by the judge")
    box: tuple[float, float, float, float] = Field(description="pixel [x1, y1, x2, y2], clipped to the image")


class GroundingParse(BaseModel):
    """Parsed grounding answer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    boxes: tuple[GroundedBox, ...] = Field((), description="valid boxes in answer order")
    warnings: tuple[str, ...] = Field((), description="warning codes (W_* constants), distinct")


# ----- Regular expressions -----

_THINK_OPEN = re.compile(r"<think(?:ing)?>", re.I)
_THINK_CLOSE = re.compile(r"</think(?:ing)?>", re.I)
_MINUS_LIKE = re.compile(r"[\u2212\u2010\u2011\u2012\u2013\ufe63](?=[ \t]?\.?\d)")  # not the em dash

# Line-start markup: quotes, headings, bullets, emphasis, table pipes, then an optional "1." item.
_LINE_PREFIX = r"^[ \t>#*_\-+•·|\[]*(?:\d{1,2}[.)][ \t]+[*_]{0,3})?"
_SCORE_QUALIFIERS = (
    "final|overall|total|global|layout|composition|relevance|quality|region|sample|image|visual|"
    "aesthetic|alignment|my|the|your|assigned"
)
_FIELD_NAMES = (
    rf"(?P<score>(?:(?:{_SCORE_QUALIFIERS})[ \t]+){{0,3}}scores?)"
    r"|(?P<reason>reason(?:ing)?|justification|explanation|rationale)"
    r"|(?P<object>identified[ \t]+object|object(?:[ \t]+identified)?)"
)
# Label, closing emphasis, optional short parenthetical ("Score (-1 to 1):"), then ':' or '='.
# Every whitespace run is followed by a required token, so failing matches cannot backtrack badly.
_FIELD_SEP = r"[*_`]{0,3}[ \t]*(?:\([^)\n]{0,40}\)[ \t]*)?(?:[*_`]{1,3}[ \t]*)?[:=]"
_FIELD_AT_LINE = re.compile(_LINE_PREFIX + rf"(?i:{_FIELD_NAMES})" + _FIELD_SEP, re.M)
# Mid-line labels must be capitalised, so that prose ("a high score: 0.9") is not a field.
_FIELD_MID_LINE = re.compile(
    r"(?<=[ \t])[*_]{0,3}(?:(?P<score>(?:Final |Overall )?Score)|(?P<reason>Reason)"
    r"|(?P<object>Identified Object))" + _FIELD_SEP
)
_REGION_AT_LINE = re.compile(
    _LINE_PREFIX + r"(?i:region(?:[ \t]+id)?)[ \t]*(?:[*_]{1,3}[ \t]*)?(?:[:#=][ \t]*)?(?:[*_]{1,3}[ \t]*)?"
    r"(?P<id>\d{1,6})(?![\d.,]\d)",
    re.M,
)
_REGION_MID_LINE = re.compile(r"(?<=[ \t])[*_]{0,3}Region ID[ \t]*(?:[:#][ \t]*)?(?P<id>\d{1,6})(?![\d.,]\d)")

_NUMBER = re.compile(
    r"[ \t*_`\"'\[(<]*(?:\n[ \t]*(?:[-*•+][ \t]+)?[*_`\"'\[(<]*)?"  # same line, or the next line
    r"(?:(?P<nonfinite>[+-]?(?:nan|inf(?:inity)?)\b)"
    r"|(?P<num>[+-]?[ \t]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)"
    r"(?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<den>\d+(?:\.\d*)?|\.\d+))?"
    r"(?P<pct>[ \t]*%)?)",
    re.I,
)
_SEPARATOR_LINE = re.compile(r"^[\s\-=*_~#]*$")
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.I | re.S)
_JSON_START = re.compile(r"[\[{]")


# ----- Helpers -----


def _uniq(codes: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(codes))


def _no_score(*codes: str) -> ScoreParse:
    return ScoreParse(score=None, warnings=_uniq((*codes, W_NO_SCORE)))


def _clamp(x: float) -> tuple[float, bool]:
    if x > 1.0:
        return 1.0, True
    if x < -1.0:
        return -1.0, True
    return x + 0.0, False  # + 0.0 turns -0.0 into 0.0


def _strip_think(text: str) -> tuple[str, bool]:
    """Drop ``<think>..</think>`` blocks; returns (text, whether a block was left unclosed).

    A stray ``</think>`` (the chat template opened the block) drops everything before it. An
    unclosed ``<think>`` only loses its tag: the model may have put its answer inside. Linear time.
    """
    parts: list[str] = []
    pos, unclosed = 0, False
    while (m := _THINK_OPEN.search(text, pos)) is not None:
        close = _THINK_CLOSE.search(text, m.end())
        parts.append(text[pos : m.start()])
        if close is None:
            parts.append("\n" + text[m.end() :])
            pos, unclosed = len(text), True
            break
        parts.append("\n")
        pos = close.end()
    parts.append(text[pos:])
    text = "".join(parts)
    last_close = max((m.end() for m in _THINK_CLOSE.finditer(text)), default=0)
    text = text[last_close:]
    return text, unclosed


def _prepare(text: Any) -> tuple[str | None, list[str]]:
    """Coerce, truncate, normalise, strip think blocks. Returns (text or None, warnings)."""
    if not isinstance(text, str):
        return None, [W_NOT_TEXT]
    warnings: list[str] = []
    if len(text) > MAX_INPUT_CHARS:
        text, warnings = text[-MAX_INPUT_CHARS:], [W_TRUNCATED]
    text = unicodedata.normalize("NFKC", text)
    text = _MINUS_LIKE.sub("-", text)
    text, unclosed = _strip_think(text)
    if unclosed:
        warnings.append(W_UNCLOSED_THINK)
    if not text.strip():
        warnings.append(W_EMPTY)
        return None, warnings
    return text, warnings


def _clean(value: str, max_chars: int, paragraph: bool = True) -> str:
    """Strip emphasis and separator lines; keep the line breaks of a multi-line value.

    With ``paragraph`` (text answers) the value ends at the first blank or ``---`` line after its
    first words, so chatter after the answer ("Let me know if ...") is not part of the reason.
    """
    lines: list[str] = []
    for raw in value.splitlines():
        line = raw.strip()
        if not line or _SEPARATOR_LINE.match(line):
            if lines and paragraph:
                break
            continue
        lines.append(line)
    return "\n".join(lines).strip().strip("*_`").strip()[:max_chars]


def _number(value: str) -> tuple[float | None, list[str], bool]:
    """Read a score from the start of ``value`` (text rules). Returns (score, warnings, clamped)."""
    m = _NUMBER.match(value)
    if m is None:
        return None, [], False
    if m.group("nonfinite"):
        return None, [W_NONFINITE], False
    if m.group("pct"):
        return None, [W_PERCENT], False
    x = float(m.group("num").replace(" ", "").replace("\t", ""))
    warnings: list[str] = []
    if m.group("den") is not None:
        warnings.append(W_FRACTION)
        den = float(m.group("den"))
        if den == 0.0:
            return None, [*warnings, W_NONFINITE], False
        x = x / den
    if math.isnan(x):
        return None, [*warnings, W_NONFINITE], False
    x, clamped = _clamp(x)
    if clamped:
        warnings.append(W_CLAMPED)
    return x, warnings, clamped


def _matches(text: str, *patterns: re.Pattern[str]) -> list[re.Match[str]]:
    """Matches of all patterns in text order; a match overlapping an earlier one is dropped."""
    kept: list[re.Match[str]] = []
    for m in sorted((m for p in patterns for m in p.finditer(text)), key=lambda m: m.start()):
        if not kept or m.start() >= kept[-1].end():
            kept.append(m)
    return kept


def _fields(text: str) -> list[tuple[str, str, int]]:
    """All fields as (kind, raw label, value): kind in score/reason/object, value up to next field."""
    kept = _matches(text, _FIELD_AT_LINE, _FIELD_MID_LINE)
    out = []
    for i, m in enumerate(kept):
        end = kept[i + 1].start() if i + 1 < len(kept) else len(text)
        kind = "score" if m.group("score") else "reason" if m.group("reason") else "object"
        out.append((kind, m.group(kind), text[m.end() : end]))
    return out


def _rank(label: str) -> int:
    """Priority of a score label: final/overall/total 2, plain 1, sub-score (quality, ...) 0."""
    words = label.lower().split()[:-1]
    if any(w in ("final", "overall", "total") for w in words):
        return 2
    if any(w in ("relevance", "quality", "composition", "visual", "aesthetic", "alignment") for w in words):
        return 0
    return 1


def _parse_block(text: str) -> ScoreParse:
    """Parse one answer (global/sample) or one region block from its fields."""
    fields = _fields(text)
    numeric: list[tuple[int, int, float, list[str], bool]] = []  # (rank, index, score, warns, clamp)
    last_failed: list[str] = []
    for i, (kind, label, value) in enumerate(fields):
        if kind != "score":
            continue
        score, warns, clamped = _number(value)
        if score is None:
            last_failed = warns
        else:
            numeric.append((_rank(label), i, score, warns, clamped))
    reasons = [(i, v) for i, (k, _, v) in enumerate(fields) if k == "reason"]
    objects = [v for k, _, v in fields if k == "object"]
    obj = _clean(objects[0], MAX_OBJECT_CHARS).split("\n")[0] if objects else None

    warnings: list[str] = []
    if numeric:
        _, chosen, score, warns, clamped = max(numeric, key=lambda c: (c[0], c[1]))
        warnings += warns
        if len(numeric) > 1:
            warnings.append(W_MULTIPLE_SCORES)
        after = [v for i, v in reasons if i > chosen]
        before = [v for i, v in reasons if i < chosen]
        reason_raw = after[0] if after else before[-1] if before else ""
    else:
        score, clamped = None, False
        warnings += [*last_failed, W_NO_SCORE]
        reason_raw = reasons[-1][1] if reasons else ""
    reason = _clean(reason_raw, MAX_REASON_CHARS)
    if not reason:
        warnings.append(W_NO_REASON)
    return ScoreParse(
        score=score, reason=reason, identified_object=obj or None, warnings=_uniq(warnings), clamped=clamped
    )


def _with(parse: ScoreParse, *codes: str) -> ScoreParse:
    """``parse`` with answer-level codes prepended."""
    return parse.model_copy(update={"warnings": _uniq((*codes, *parse.warnings))})


def _expected(ids: Sequence[int]) -> list[int]:
    out: list[int] = []
    for i in ids:
        try:
            out.append(int(i))
        except (TypeError, ValueError, OverflowError):
            continue
    return list(dict.fromkeys(out))


def _assemble(expected: list[int], blocks: list[tuple[int, ScoreParse]], pre: list[str]) -> RegionsParse:
    """Apply the missing / duplicate / unknown rules to (id, parse) blocks in answer order."""
    top = list(pre)
    chosen: dict[int, ScoreParse] = {}
    scored_count: dict[int, int] = {}
    for rid, parse in blocks:
        if rid not in expected:
            top.append(W_UNKNOWN_REGION)
            continue
        has_score = parse.score is not None
        scored_count[rid] = scored_count.get(rid, 0) + int(has_score)
        if rid not in chosen or (chosen[rid].score is None and has_score):
            chosen[rid] = parse
    regions: dict[int, ScoreParse] = {}
    for rid in expected:
        if rid not in chosen:
            regions[rid] = _no_score(W_MISSING_REGION)
        elif scored_count.get(rid, 0) > 1:
            regions[rid] = _with(chosen[rid], W_DUPLICATE_REGION)
        else:
            regions[rid] = chosen[rid]
    for parse in regions.values():
        top.extend(parse.warnings)
    return RegionsParse(regions=regions, warnings=_uniq(top))


def _regions_failed(expected_ids: Any) -> RegionsParse:
    """Result for an internal error: every id (if the ids are usable) without a score."""
    try:
        ids = _expected(expected_ids)
    except Exception:
        ids = []
    return RegionsParse(
        regions={i: _no_score(W_INTERNAL_ERROR) for i in ids}, warnings=(W_INTERNAL_ERROR, W_NO_SCORE)
    )


# ----- Text parsers -----


def _score_text(text: Any) -> ScoreParse:
    body, pre = _prepare(text)
    if body is None:
        return _no_score(*pre)
    return _with(_parse_block(body), *pre)


def parse_score_text(text: Any) -> ScoreParse:
    """Parse a global-layout or sample-level answer (``Score:`` / ``Reason:``). Never raises."""
    try:
        return _score_text(text)
    except Exception:  # contract: never raise (tests assert this branch is never taken)
        return _no_score(W_INTERNAL_ERROR)


def _regions_text(text: Any, expected_ids: Sequence[int]) -> RegionsParse:
    expected = _expected(expected_ids)
    body, pre = _prepare(text)
    if body is None:
        return _assemble(expected, [], pre)
    kept = _matches(body, _REGION_AT_LINE, _REGION_MID_LINE)
    if not kept:
        pre.append(W_NO_REGION_HEADER)
        if len(expected) == 1:
            return _assemble(expected, [(expected[0], _parse_block(body))], pre)
        return _assemble(expected, [], pre)
    blocks = []
    for i, m in enumerate(kept):
        end = kept[i + 1].start() if i + 1 < len(kept) else len(body)
        # The rest of the header line ("Region ID: 1, box [..]") is not part of any field.
        blocks.append((int(m.group("id")), _parse_block(body[m.end() : end])))
    return _assemble(expected, blocks, pre)


def parse_regions_text(text: Any, expected_ids: Sequence[int]) -> RegionsParse:
    """Parse a region answer (``Region ID: k`` blocks). Never raises."""
    try:
        return _regions_text(text, expected_ids)
    except Exception:  # contract: never raise
        return _regions_failed(expected_ids)


# ----- JSON parsers (structured output) -----


def _find_json(text: str, want: Callable[[Any], bool]) -> Any:
    """First JSON value (inside a code fence first, then anywhere) that satisfies ``want``."""
    decoder = json.JSONDecoder()
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for cand in candidates:
        for k, m in enumerate(_JSON_START.finditer(cand)):
            if k >= _MAX_JSON_ATTEMPTS:
                break
            try:
                value, _ = decoder.raw_decode(cand, m.start())
            except (ValueError, RecursionError):
                continue
            if want(value):
                return value
    return None


def _lower_keys(d: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in d.items()}


def _json_score(value: Any) -> tuple[float | None, list[str], bool]:
    """Integers are tenths, floats are on [-1, 1], strings follow the text rules."""
    if value is None:
        return None, [], False
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None, [W_BAD_SCORE_TYPE], False
    if isinstance(value, str):
        return _number(value)
    if isinstance(value, int):
        x = value / 10 if abs(value) <= 10 else math.copysign(2.0, value)
    else:
        x = value
    if not math.isfinite(x):
        return None, [W_NONFINITE], False
    x, clamped = _clamp(x)
    return x, [W_CLAMPED] if clamped else [], clamped


def _json_entry(d: dict[Any, Any]) -> ScoreParse:
    d = _lower_keys(d)
    score, warns, clamped = _json_score(d.get("score"))
    reason = d.get("reason", "")
    reason = _clean(reason if isinstance(reason, str) else json.dumps(reason), MAX_REASON_CHARS, False)
    obj = d.get("object", d.get("identified_object"))
    obj = _clean(obj, MAX_OBJECT_CHARS, False) if isinstance(obj, str) else None
    if score is None:
        warns = [*warns, W_NO_SCORE]
    if not reason:
        warns = [*warns, W_NO_REASON]
    return ScoreParse(
        score=score, reason=reason, identified_object=obj or None, warnings=_uniq(warns), clamped=clamped
    )


def _score_json(text: Any) -> ScoreParse:
    body, pre = _prepare(text)
    if body is None:
        return _no_score(*pre)
    found = _find_json(body, lambda v: isinstance(v, dict) and "score" in _lower_keys(v))
    if found is None:
        return _with(_parse_block(body), *pre, W_BAD_JSON)
    return _with(_json_entry(found), *pre)


def parse_score_json(text: Any) -> ScoreParse:
    """Parse a structured global / sample-level answer ``{"score": tenths, "reason": str}``."""
    try:
        return _score_json(text)
    except Exception:  # contract: never raise
        return _no_score(W_INTERNAL_ERROR)


def _region_id(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _region_list(value: Any) -> list[Any] | None:
    if isinstance(value, dict):
        value = _lower_keys(value).get("regions")
    return value if isinstance(value, list) else None


def _regions_json(text: Any, expected_ids: Sequence[int]) -> RegionsParse:
    expected = _expected(expected_ids)
    body, pre = _prepare(text)
    if body is None:
        return _assemble(expected, [], pre)
    found = _find_json(body, lambda v: _region_list(v) is not None)
    if found is None:
        fallback = _regions_text(body, expected)
        return fallback.model_copy(update={"warnings": _uniq((*pre, W_BAD_JSON, *fallback.warnings))})
    blocks: list[tuple[int, ScoreParse]] = []
    for item in _region_list(found) or []:
        rid = _region_id(_lower_keys(item).get("id")) if isinstance(item, dict) else None
        if rid is None or not isinstance(item, dict):
            pre.append(W_UNKNOWN_REGION)
            continue
        blocks.append((rid, _json_entry(item)))
    return _assemble(expected, blocks, pre)


def parse_regions_json(text: Any, expected_ids: Sequence[int]) -> RegionsParse:
    """Parse a structured region answer ``{"regions": [{id, object, score, reason}, ...]}``."""
    try:
        return _regions_json(text, expected_ids)
    except Exception:  # contract: never raise
        return _regions_failed(expected_ids)


# ----- Grounding answers -----


def _grounding(text: Any, width: float, height: float) -> GroundingParse:
    body, pre = _prepare(text)
    if body is None:
        return GroundingParse(warnings=_uniq(pre))
    found = _find_json(body, lambda v: isinstance(v, list) or (isinstance(v, dict) and "objects" in v))
    if isinstance(found, dict):
        found = found.get("objects")
    if not isinstance(found, list):
        return GroundingParse(warnings=_uniq((*pre, W_BAD_JSON)))
    boxes: list[GroundedBox] = []
    for item in found:
        d = _lower_keys(item) if isinstance(item, dict) else {}
        raw = d.get("box", d.get("bbox_2d", d.get("bbox")))
        ok = isinstance(raw, list) and len(raw) == 4
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)
        ok = ok and all(math.isfinite(v) for v in raw)
        if not ok:
            pre.append(W_BAD_BOX)
            continue
        x1, x2 = (min(max(float(v), 0.0), float(width)) for v in (raw[0], raw[2]))
        y1, y2 = (min(max(float(v), 0.0), float(height)) for v in (raw[1], raw[3]))
        if x2 <= x1 or y2 <= y1:
            pre.append(W_BAD_BOX)
            continue
        label = d.get("label", "")
        boxes.append(GroundedBox(label=_clean(str(label), MAX_OBJECT_CHARS), box=(x1, y1, x2, y2)))
    return GroundingParse(boxes=tuple(boxes), warnings=_uniq(pre))


def parse_grounding_json(text: Any, width: float, height: float) -> GroundingParse:
    """Parse a grounding answer (``[{"label", "box"|"bbox_2d"}]``); boxes are clipped to the image.

    Boxes that are not four finite numbers, or are empty after clipping, are dropped (W_BAD_BOX).
    """
    try:
        return _grounding(text, width, height)
    except Exception:  # contract: never raise
        return GroundingParse(warnings=(W_INTERNAL_ERROR,))
