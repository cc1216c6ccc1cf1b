"""Parse judge answers into typed scores. No function here raises, whatever the input.

The judge is asked (:mod:`rewards.prompts`) for ``Score:`` / ``Reason:`` lines (per region under
``Region ID: k`` with ``Identified Object:``) on the scale [-1, 1], or in JSON mode for
``{"score": tenths, ...}``. Real answers are messier; this is what counts as the score.

**Preparation** (once per answer). A non-str is no answer (:data:`W_NOT_TEXT`); only the last
``MAX_INPUT_CHARS`` are read (:data:`W_TRUNCATED`). Line breaks are unified, terminal escape
sequences and invisible format characters (BOM, zero-width space and joiners, soft hyphen, bidi
marks) are removed, other control characters become spaces; then NFKC (full-width digits and
colons) and unicode minus / hyphen / en dash before a digit become ``-``.

**Think blocks.** ``<think>..</think>`` (or ``<thinking>``) is dropped; a stray ``</think>`` drops
everything before it (the chat template opened the block). The text after an unclosed ``<think>``
is thinking too (:data:`W_UNCLOSED_THINK`): a score comes from it only when the answer outside has
none, and is then ambiguous (:data:`W_TRUNCATED_THINK`). JSON is decoded with the tags still in, so
tags inside JSON strings stay; a JSON value counts when it starts outside think blocks (or spans
the stray ``</think>``, which then sits in one of its strings).

**Fields.** A label at the start of a line, after markup (``>``, ``#``, bullets, emphasis, ``|``,
``[``, ``1.``), then an optional short parenthetical, closing emphasis and ``:`` or ``=``. Score
labels: ``Score`` with up to three qualifiers (``Final``, ``Overall``, ``Layout``, ``Quality``,
``My``, ...); reason: ``Reason(ing)``, ``Justification``, ``Explanation``, ``Rationale``; object:
``Identified Object``, ``Object``. A capitalised label mid-line (``Score: 0.9 Reason: ...``) is a
field only after a score or object field of the same line, so labels inside a reason are prose.
Quoted lines (``> Score: 1``) are fields only when the block's first field is quoted. A value runs
to the next field; a reason (and an object) also ends at a blank or ``---`` line.

**Which score.** A number followed on its line by a word ("Score: 0.9 would be too high"; but
not a field label or ``because``, ``since``, ``points``, ...) is prose: it counts only when no score
field holds a clean number, and is then ambiguous (:data:`W_PROSE_SCORE`); otherwise it is text of
the field it sits in. Labels rank final/overall/total > plain (layout, global, ...) >
sub-scores (relevance, quality, composition, visual, aesthetic, alignment); the last field of the
best rank is the reading. Different values among the fields above sub-score rank (or among the
sub-scores, when there is nothing else) are ambiguous (:data:`W_AMBIGUOUS_SCORES`): a self-correction
or a ``Final Score`` that disagrees with ``Score``. Several numeric fields add
:data:`W_MULTIPLE_SCORES`. The reason is the first ``Reason`` after the chosen score, else the last
one before it.

**Numbers** (after opening markup, on the label's line or the next, also as a list item):
``-0.5``, ``+.5``, ``0.``, ``1e3``; ``0,8`` is 0.8 (:data:`W_DECIMAL_COMMA`), ``1,000`` too but
ambiguous (thousands?). A minus apart from its digits (``Score: - 0.5``) is a minus, a ``- `` list
bullet before the number on the next line (``Score:\\n- 0.5``) a bullet (+0.5): both ambiguous
(:data:`W_AMBIGUOUS_NUMBER`). A letter, ``_digit`` or ``.digit`` glued to the number (``0x10``,
``1_000``, ``1.2.3``) is no number (:data:`W_BAD_NUMBER`); a second number right after it (``0. 5``)
is ambiguous. ``80%`` is no score (:data:`W_PERCENT`), nor are ``nan``, ``inf``, ``a/0``
(:data:`W_NONFINITE`). Huge literals are +-inf, never ints, so nothing overflows.

**Scales.** Text prompts ask for ``UNIT`` ([-1, 1]), JSON prompts for ``TENTHS`` (integers
-10..10). The rules below hold for a value in any form (text line, JSON number, JSON string) and
of any JSON type; only the prompt's scale matters.

* bare ``x``, UNIT: ``|x| <= 1`` -> x; else x/10 (the tenths reading), :data:`W_OTHER_SCALE`.
* bare ``x``, TENTHS: non-integer ``|x| < 1`` -> x (tenths are integers); else x/10, and ``1.0`` /
  ``-1.0`` written with a point -> +-0.1 with :data:`W_OTHER_SCALE` (it may mean 1.0).
* a scale in the answer: ``a/b``, ``a out of b`` (:data:`W_FRACTION`), a label ``Score (0-10):``,
  a trailing ``(0-10)`` or ``on a scale of 0 to 10``. Top 1 or range -1..1 -> a; range -10..10 ->
  a/10; ``a/b`` with b != 1 -> a/b with :data:`W_OTHER_SCALE`; another range lo..hi -> linear onto
  [-1, 1] with :data:`W_OTHER_SCALE`. A vulgar fraction (``½``) is a number (0.5).
* a reading outside [-1, 1] is clamped (:data:`W_CLAMPED`), never used as a confident maximum.

**Forms.** Text parsers read fields; when no field gives a score they read a JSON answer
(:data:`W_JSON_ANSWER`). JSON parsers read the first JSON value of the wanted shape (code fences
first), else the text grammar (:data:`W_BAD_JSON`). Score: an object with a ``score`` key (any
case; a key repeated with different values is :data:`W_AMBIGUOUS_SCORES`). Regions:
``{"regions": [...]}`` or a list holding an object with ``id`` or ``score``, so a stray ``[1, 2]``
is no answer. Grounding: ``{"objects": [...]}`` or a list holding an object, else ``[]``.

**Regions.** A header is ``Region ID: k`` / ``Region k`` / ``Region #k`` (any case) at a line
start, ended by a line end, ``:``, a dash, ``|``, ``#``, a parenthetical, a final ``.``, a box or a
field ("region 2 of the field", "Region 2, which" are prose); mid-line only ``Region ID: k``
before a field. Ids longer than ``MAX_ID_DIGITS`` are no ids. Every expected id gets an entry
(:data:`W_MISSING_REGION` when absent); for an id with several blocks the first block with a score
wins (a restated header is no duplicate), :data:`W_DUPLICATE_REGION` when two carry scores, plus
:data:`W_AMBIGUOUS_SCORES` when they differ; other ids are ignored (:data:`W_UNKNOWN_REGION`).
Without headers: a JSON answer, else with one expected id the whole answer is that region
(:data:`W_NO_REGION_HEADER`).

Not read (no score, never a guess): markdown tables, unlabelled prose ("a score of 0.8").

**Invariants** (tests check): ``score is None`` iff :data:`W_NO_SCORE` is in ``warnings``;
``clamped`` iff :data:`W_CLAMPED` is; ``ambiguous`` iff a code of :data:`AMBIGUITY_CODES` is, and
then the score is not None (it is the best reading); scores are finite and in [-1, 1]; warnings are
distinct, in order of first occurrence; :data:`W_INTERNAL_ERROR` never appears. ``RegionsParse``:
keys are the expected ids as ints, in order, duplicates and unusable ids dropped
(:data:`W_BAD_ARGUMENT`); ``warnings`` are the answer-level codes plus the union of the regions';
``ambiguous`` iff some region is.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from rewards.parse_codes import (
    AMBIGUITY_CODES,
    MAX_ID_DIGITS,
    MAX_INPUT_CHARS,
    MAX_OBJECT_CHARS,
    MAX_REASON_CHARS,
    TENTHS,
    UNIT,
    W_AMBIGUOUS_NUMBER,
    W_AMBIGUOUS_SCORES,
    W_BAD_ARGUMENT,
    W_BAD_BOX,
    W_BAD_JSON,
    W_BAD_NUMBER,
    W_BAD_SCORE_TYPE,
    W_CLAMPED,
    W_DECIMAL_COMMA,
    W_DUPLICATE_REGION,
    W_EMPTY,
    W_FRACTION,
    W_INTERNAL_ERROR,
    W_JSON_ANSWER,
    W_MISSING_REGION,
    W_MULTIPLE_SCORES,
    W_NO_REASON,
    W_NO_REGION_HEADER,
    W_NO_SCORE,
    W_NONFINITE,
    W_NOT_TEXT,
    W_OTHER_SCALE,
    W_PERCENT,
    W_PROSE_SCORE,
    W_TRUNCATED,
    W_TRUNCATED_THINK,
    W_UNCLOSED_THINK,
    W_UNKNOWN_REGION,
)
from rewards.parse_json import (
    BOX_KEYS,
    Found,
    JsonObject,
    dumps,
    find_json,
    json_score,
    lower_keys,
    region_id,
    region_items,
    want_boxes,
    want_empty,
    want_regions,
    want_score,
)
from rewards.parse_text import Block, Prepared, clean, prepare, read_block, region_blocks

__all__ = [
    "AMBIGUITY_CODES", "MAX_ID_DIGITS", "MAX_INPUT_CHARS", "MAX_OBJECT_CHARS", "MAX_REASON_CHARS", "TENTHS",
    "UNIT", "W_AMBIGUOUS_NUMBER", "W_AMBIGUOUS_SCORES", "W_BAD_ARGUMENT", "W_BAD_BOX", "W_BAD_JSON",
    "W_BAD_NUMBER", "W_BAD_SCORE_TYPE", "W_CLAMPED", "W_DECIMAL_COMMA", "W_DUPLICATE_REGION", "W_EMPTY",
    "W_FRACTION", "W_INTERNAL_ERROR", "W_JSON_ANSWER", "W_MISSING_REGION", "W_MULTIPLE_SCORES",
    "W_NONFINITE", "W_NOT_TEXT", "W_NO_REASON", "W_NO_REGION_HEADER", "W_NO_SCORE", "W_OTHER_SCALE",
    "W_PERCENT", "W_PROSE_SCORE", "W_TRUNCATED", "W_TRUNCATED_THINK", "W_UNCLOSED_THINK",
    "W_UNKNOWN_REGION", "GroundedBox", "GroundingParse", "RegionsParse", "ScoreParse",
    "parse_grounding_json", "parse_regions_json", "parse_regions_text", "parse_score_json",
    "parse_score_text",
]


class ScoreParse(BaseModel):
    """One parsed score (global, sample-level, or one region)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    score: float | None = Field(description="score in [-1, 1] (the best reading), or None when none was read")
    reason: str = Field("", description="the judge's justification ('' when absent)")
    identified_object: str | None = Field(None, description="region answers: the object the judge named")
    warnings: tuple[str, ...] = Field((), description="warning codes (W_* constants), distinct")
    clamped: bool = Field(False, description="the reading was outside [-1, 1] and was clamped")
    ambiguous: bool = Field(False, description="the score is only a best reading (AMBIGUITY_CODES say why)")


class RegionsParse(BaseModel):
    """Parsed region answer: one entry per expected id, in the order of the expected ids."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    regions: dict[int, ScoreParse] = Field(description="expected region id -> its parse")
    warnings: tuple[str, ...] = Field((), description="answer-level codes plus the union of the regions'")
    ambiguous: bool = Field(False, description="some region's score is ambiguous")


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


# ----- results -----


def _uniq(codes: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(codes))


def _make(score: float | None, codes: Iterable[str], reason: str = "", obj: str | None = None) -> ScoreParse:
    """The one constructor of parses: derives ``clamped`` / ``ambiguous`` and keeps the invariants."""
    if score is None:
        codes = [*(c for c in codes if c not in AMBIGUITY_CODES), W_NO_SCORE]
    warnings = _uniq(codes)
    return ScoreParse(
        score=score, reason=reason, identified_object=obj or None, warnings=warnings,
        clamped=W_CLAMPED in warnings, ambiguous=not AMBIGUITY_CODES.isdisjoint(warnings),
    )


def _no_score(*codes: str) -> ScoreParse:
    return _make(None, codes)


def _with(p: ScoreParse, *codes: str) -> ScoreParse:
    """``p`` with codes prepended."""
    return _make(p.score, (*codes, *p.warnings), p.reason, p.identified_object)


def _from_block(b: Block) -> ScoreParse:
    return _make(b.score, b.codes, b.reason, b.obj)


def _json_entry(d: dict[Any, Any], scale: str) -> ScoreParse:
    """One JSON answer object (global, or one region) by the number grammar."""
    conflicts = d.conflicts if isinstance(d, JsonObject) else frozenset()
    d = lower_keys(d)
    r = json_score(d.get("score"), scale)
    codes = [*r.codes, *([W_PROSE_SCORE] if r.prose else [])]
    if "score" in conflicts:
        codes.append(W_AMBIGUOUS_SCORES)
    reason = d.get("reason", "")
    reason = clean(reason if isinstance(reason, str) else dumps(reason), MAX_REASON_CHARS, False)
    obj = d.get("object", d.get("identified_object"))
    obj = clean(obj, MAX_OBJECT_CHARS, False) if isinstance(obj, str) else None
    if not reason:
        codes.append(W_NO_REASON)
    return _make(r.score, codes, reason, obj)


# ----- text -----


def _read_text(prep: Prepared, scale: str) -> ScoreParse:
    """The score of the answer outside thinking, else (ambiguous) of an unclosed think block."""
    out = _from_block(read_block(prep.answer, scale)) if prep.answer.strip() else None
    if out is not None and out.score is not None:
        return out
    if prep.inside is not None and prep.inside.strip():
        inside = _from_block(read_block(prep.inside, scale))
        if inside.score is not None or out is None:
            return _with(inside, W_TRUNCATED_THINK)
    return out if out is not None else _no_score()


def _score_text(text: Any) -> ScoreParse:
    prep, pre = prepare(text)
    if prep is None:
        return _no_score(*pre)
    parsed = _read_text(prep, UNIT)
    if parsed.score is None and (found := find_json(prep, want_score)) is not None:
        entry = _json_entry(found.value, UNIT)
        if entry.score is not None:
            return _with(entry, *found.codes, W_JSON_ANSWER, *([W_TRUNCATED_THINK] if found.inside else []))
    return _with(parsed, *pre)


def parse_score_text(text: Any) -> ScoreParse:
    """Parse a global-layout or sample-level answer (``Score:`` / ``Reason:``). Never raises."""
    try:
        return _score_text(text)
    except Exception:  # contract: never raise (tests assert this branch is never taken)
        return _no_score(W_INTERNAL_ERROR)


def _expected(ids: Any) -> tuple[list[int], list[str]]:
    """The expected ids as distinct ints in order; W_BAD_ARGUMENT when some were unusable."""
    try:
        raw = [] if isinstance(ids, (str, bytes)) else list(ids)
    except Exception:  # not iterable, or its iterator failed: a caller error, reported as a code
        return [], [W_BAD_ARGUMENT]
    out = [region_id(i) for i in raw]
    kept = list(dict.fromkeys(i for i in out if i is not None))
    return kept, [W_BAD_ARGUMENT] if None in out or isinstance(ids, (str, bytes)) else []


def _assemble(expected: list[int], blocks: list[tuple[int | None, ScoreParse]], pre: list[str]) -> RegionsParse:
    """Apply the missing / duplicate / unknown rules to (id, parse) blocks in answer order."""
    top = list(pre)
    wanted = set(expected)
    chosen: dict[int, ScoreParse] = {}
    scores: dict[int, list[float]] = {}
    for rid, parse in blocks:
        if rid is None or rid not in wanted:
            top.append(W_UNKNOWN_REGION)
            continue
        if parse.score is not None:
            scores.setdefault(rid, []).append(parse.score)
        if rid not in chosen or (chosen[rid].score is None and parse.score is not None):
            chosen[rid] = parse
    regions: dict[int, ScoreParse] = {}
    for rid in expected:
        if rid not in chosen:
            regions[rid] = _no_score(W_MISSING_REGION)
            continue
        got = scores.get(rid, [])
        dup = [W_DUPLICATE_REGION] if len(got) > 1 else []
        differ = [W_AMBIGUOUS_SCORES] if len(set(got)) > 1 else []
        regions[rid] = _with(chosen[rid], *dup, *differ) if dup else chosen[rid]
    for parse in regions.values():
        top.extend(parse.warnings)
    return RegionsParse(
        regions=regions, warnings=_uniq(top), ambiguous=any(p.ambiguous for p in regions.values())
    )


def _text_blocks(body: str | None, scale: str) -> list[tuple[int | None, ScoreParse]] | None:
    found = region_blocks(body) if body else None
    return None if found is None else [(rid, _from_block(read_block(t, scale))) for rid, t in found]


def _regions_from_text(
    prep: Prepared, expected: list[int], scale: str, pre: list[str], read_json: bool
) -> RegionsParse:
    outside = _text_blocks(prep.answer, scale)
    inside = _text_blocks(prep.inside, scale)
    if outside is None and inside is None:
        if read_json and (found := find_json(prep, want_regions)) is not None:
            return _regions_from_json(found, expected, scale, [*pre, W_JSON_ANSWER])
        pre = [*pre, W_NO_REGION_HEADER]
        if len(expected) == 1:
            return _assemble(expected, [(expected[0], _read_text(prep, scale))], pre)
        return _assemble(expected, [], pre)
    blocks = list(outside or [])
    scored = {rid for rid, p in blocks if p.score is not None}
    blocks += [(rid, _with(p, W_TRUNCATED_THINK)) for rid, p in inside or [] if rid not in scored]
    return _assemble(expected, blocks, pre)


def _regions_text(text: Any, expected_ids: Any) -> RegionsParse:
    expected, bad = _expected(expected_ids)
    prep, pre = prepare(text)
    if prep is None:
        return _assemble(expected, [], [*bad, *pre])
    return _regions_from_text(prep, expected, UNIT, [*bad, *pre], read_json=True)


def parse_regions_text(text: Any, expected_ids: Sequence[int]) -> RegionsParse:
    """Parse a region answer (``Region ID: k`` blocks). Never raises."""
    try:
        return _regions_text(text, expected_ids)
    except Exception:  # contract: never raise
        return _regions_failed(expected_ids)


def _regions_failed(expected_ids: Any) -> RegionsParse:
    """Result for an internal error: every id (if the ids are usable) without a score."""
    try:
        ids = _expected(expected_ids)[0]
    except Exception:
        ids = []
    return RegionsParse(
        regions={i: _no_score(W_INTERNAL_ERROR) for i in ids}, warnings=(W_INTERNAL_ERROR, W_NO_SCORE)
    )


# ----- JSON parsers (structured output) -----


def _score_json(text: Any) -> ScoreParse:
    prep, pre = prepare(text)
    if prep is None:
        return _no_score(*pre)
    found = find_json(prep, want_score)
    if found is None:
        return _with(_read_text(prep, TENTHS), *pre, W_BAD_JSON)
    return _with(_json_entry(found.value, TENTHS), *found.codes, *([W_TRUNCATED_THINK] if found.inside else []))


def parse_score_json(text: Any) -> ScoreParse:
    """Parse a structured global / sample-level answer ``{"score": tenths, "reason": str}``."""
    try:
        return _score_json(text)
    except Exception:  # contract: never raise
        return _no_score(W_INTERNAL_ERROR)


def _regions_from_json(found: Found, expected: list[int], scale: str, pre: list[str]) -> RegionsParse:
    top = [*pre, *found.codes]
    blocks: list[tuple[int | None, ScoreParse]] = []
    for item in region_items(found.value) or []:
        d = lower_keys(item) if isinstance(item, dict) else None
        rid = region_id(d.get("id", d.get("region_id"))) if d is not None else None
        if rid is None:
            top.append(W_UNKNOWN_REGION)
            continue
        entry = _json_entry(item, scale)
        blocks.append((rid, _with(entry, W_TRUNCATED_THINK) if found.inside else entry))
    return _assemble(expected, blocks, top)


def _regions_json(text: Any, expected_ids: Any) -> RegionsParse:
    expected, bad = _expected(expected_ids)
    prep, pre = prepare(text)
    if prep is None:
        return _assemble(expected, [], [*bad, *pre])
    found = find_json(prep, want_regions)
    if found is None:
        return _regions_from_text(prep, expected, TENTHS, [*bad, *pre, W_BAD_JSON], read_json=False)
    return _regions_from_json(found, expected, TENTHS, bad)


def parse_regions_json(text: Any, expected_ids: Sequence[int]) -> RegionsParse:
    """Parse a structured region answer ``{"regions": [{id, object, score, reason}, ...]}``."""
    try:
        return _regions_json(text, expected_ids)
    except Exception:  # contract: never raise
        return _regions_failed(expected_ids)


# ----- Grounding answers -----

def _dimension(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError, OverflowError):
        return None
    return x if math.isfinite(x) and x > 0 else None


def _grounding(text: Any, width: Any, height: Any) -> GroundingParse:
    prep, pre = prepare(text)
    if prep is None:
        return GroundingParse(warnings=_uniq(pre))
    w, h = _dimension(width), _dimension(height)
    if w is None or h is None:
        return GroundingParse(warnings=_uniq((*pre, W_BAD_ARGUMENT)))
    found = find_json(prep, want_boxes) or find_json(prep, want_empty)
    if found is None:
        return GroundingParse(warnings=_uniq((*pre, W_BAD_JSON)))
    items = lower_keys(found.value).get("objects") if isinstance(found.value, dict) else found.value
    codes = list(found.codes)
    boxes: list[GroundedBox] = []
    for item in items:
        d = lower_keys(item) if isinstance(item, dict) else {}
        raw = next((d[k] for k in BOX_KEYS if k in d), None)
        ok = isinstance(raw, list) and len(raw) == 4
        ok = ok and all(isinstance(v, float) and math.isfinite(v) for v in raw)  # JSON numbers are floats
        if not ok:
            codes.append(W_BAD_BOX)
            continue
        x1, x2 = (min(max(float(v), 0.0), w) for v in (raw[0], raw[2]))
        y1, y2 = (min(max(float(v), 0.0), h) for v in (raw[1], raw[3]))
        if x2 <= x1 or y2 <= y1:
            codes.append(W_BAD_BOX)
            continue
        label = d.get("label", "")
        label = label if isinstance(label, str) else ""
        boxes.append(GroundedBox(label=clean(label, MAX_OBJECT_CHARS), box=(x1, y1, x2, y2)))
    return GroundingParse(boxes=tuple(boxes), warnings=_uniq(codes))


def parse_grounding_json(text: Any, width: float, height: float) -> GroundingParse:
    """Parse a grounding answer (``[{"label", "box"|"bbox_2d"}]``); boxes are clipped to the image.

    Boxes that are not four finite numbers, or are empty after clipping, are dropped (W_BAD_BOX).
    """
    try:
        return _grounding(text, width, height)
    except Exception:  # contract: never raise
        return GroundingParse(warnings=(W_INTERNAL_ERROR,))
