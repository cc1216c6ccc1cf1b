"""JSON side of the judge-answer grammar (see :mod:`rewards.parse`): finding the answer's JSON value
outside thinking, decoding it overflow-safe, and the shapes each parser wants. Never raises.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from rewards.parse_codes import MAX_ID_DIGITS, W_BAD_SCORE_TYPE, W_UNCLOSED_THINK
from rewards.parse_numbers import NO_NUMBER, JsonNumber, Reading, read_number
from rewards.parse_text import Prepared, json_tier

_MAX_JSON_ATTEMPTS = 64  # decodes tried per search pass (fences, then the whole answer)
_FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.I | re.S)
_JSON_START = re.compile(r"\{\s*[\"}]|\[\s*[{\]]")  # an object, a list of objects, or empty


class JsonObject(dict):  # type: ignore[type-arg]
    """A decoded JSON object; ``conflicts``: keys (lower case) repeated with different values."""

    __slots__ = ("conflicts",)

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        seen: dict[str, Any] = {}
        conflicts = set()
        for k, v in pairs:
            key = k.strip().lower()
            if key in seen and seen[key] != v:
                conflicts.add(key)
            seen[key] = v
        self.conflicts = frozenset(conflicts)


_DECODER = json.JSONDecoder(
    object_pairs_hook=JsonObject, parse_float=JsonNumber, parse_int=JsonNumber, parse_constant=JsonNumber,
    strict=False,
)


class Found(NamedTuple):
    value: Any
    codes: tuple[str, ...]  # the answer-level codes that hold for this value
    inside: bool  # the value lies inside an unclosed <think>


def find_json(prep: Prepared, want: Callable[[Any], bool]) -> Found | None:
    """First JSON value satisfying ``want``: in code fences first, outside thinking first."""
    text, later = prep.text, {}
    passes = [(m.start(1), m.end(1)) for m in _FENCE.finditer(text)] + [(0, len(text))]
    tried: set[int] = set()
    for lo, hi in passes:
        attempts = 0
        for m in _JSON_START.finditer(text, lo, hi):
            start = m.start()
            if start in tried or json_tier(prep, start, len(text)) is None:
                continue
            tried.add(start)
            attempts += 1
            if attempts > _MAX_JSON_ATTEMPTS:
                break
            try:
                value, end = _DECODER.raw_decode(text, start)
            except (ValueError, RecursionError):
                continue
            if not want(value):
                continue
            tier = json_tier(prep, start, end)
            if tier == 0:
                return _found(prep, value, start, end, tier)
            if tier is not None:
                later.setdefault(tier, (value, start, end))
    if not later:
        return None
    tier = min(later)
    return _found(prep, *later[tier], tier)


def _found(prep: Prepared, value: Any, start: int, end: int, tier: int) -> Found:
    tag_inside = prep.open_at is not None and start <= prep.open_at < end  # "<think>" in a string
    codes = tuple(c for c in prep.codes if c != W_UNCLOSED_THINK or not tag_inside)
    return Found(value, codes, tier == 2)


def lower_keys(d: dict[Any, Any]) -> dict[str, Any]:
    return {str(k).strip().lower(): v for k, v in d.items()}


def dumps(value: Any) -> str:
    """A non-string JSON value as text ("" when it cannot be written)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return ""


def json_score(value: Any, scale: str) -> Reading:
    """A JSON score by the number grammar: its literal (numbers) or its text (strings)."""
    if value is None:
        return NO_NUMBER
    if isinstance(value, JsonNumber):
        return read_number(value.text, scale)
    if isinstance(value, str):
        return read_number(value, scale)
    return Reading(None, (W_BAD_SCORE_TYPE,))


# ----- the shapes the parsers want -----

BOX_KEYS = ("box", "bbox_2d", "bbox")


def want_boxes(v: Any) -> bool:
    if isinstance(v, dict):
        return isinstance(lower_keys(v).get("objects"), list)
    return isinstance(v, list) and any(isinstance(i, dict) for i in v)


def want_empty(v: Any) -> bool:
    return isinstance(v, list) and not v


def want_score(v: Any) -> bool:
    return isinstance(v, dict) and "score" in lower_keys(v)


def region_items(v: Any) -> list[Any] | None:
    if isinstance(v, dict):
        v = lower_keys(v).get("regions")
    return v if isinstance(v, list) else None


def want_regions(v: Any) -> bool:
    items = region_items(v)
    if items is None:
        return False
    return isinstance(v, dict) or any(isinstance(i, dict) and {"id", "score"} & set(lower_keys(i)) for i in items)


def region_id(value: Any) -> int | None:
    """An id: an integral number or digit string of at most MAX_ID_DIGITS digits, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        s = value.strip()
        return int(s) if s.isascii() and s.isdigit() and len(s) <= MAX_ID_DIGITS else None
    if isinstance(value, float):
        ok = value.is_integer() and abs(value) < 10**MAX_ID_DIGITS
        return int(value) if ok else None
    try:
        i = operator.index(value)
    except TypeError:
        return None
    return i if abs(i) < 10**MAX_ID_DIGITS else None
