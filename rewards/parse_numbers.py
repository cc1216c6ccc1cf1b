"""Number grammar of judge answers: one score value -> a score on [-1, 1] plus codes.

Text and JSON answers share :func:`read_number`, so a value reads the same whatever its form
(``7``, ``7.0``, ``"7"``, ``Score: 7``); only the scale the prompt asked for (``UNIT`` or
``TENTHS``) changes the reading. The rules are listed in :mod:`rewards.parse`'s docstring.
Never raises; overflow-safe (a huge literal is +-inf, which is clamped, never converted to int).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from rewards.parse_codes import (
    TENTHS,
    UNIT,
    W_AMBIGUOUS_NUMBER,
    W_BAD_NUMBER,
    W_CLAMPED,
    W_DECIMAL_COMMA,
    W_FRACTION,
    W_NONFINITE,
    W_OTHER_SCALE,
    W_PERCENT,
)

_LIT = r"(?:[0-9]+(?:\.[0-9]*|,[0-9]+)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_DEN = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
VULGAR_SLASH = "\u2044"  # NFKC writes "½" as "1⁄2"

_VALUE = re.compile(
    r"[ \t*_`\"'\[(<]*"  # opening markup on the label's line
    r"(?:\n[ \t]*(?:(?P<bullet>[-*•+])[ \t]+)?[*_`\"'\[(<]*)?"  # or the next line, maybe a list item
    r"(?:(?P<nonfinite>[+-]?(?:nan|inf(?:inity)?)\b)"
    rf"|(?:(?P<sign>[+-])(?P<gap>[ \t]+)?)?(?P<lit>{_LIT})"
    rf"(?:[ \t*_`]*\(?[ \t]*(?P<slash>/|{VULGAR_SLASH}|out[ \t]+of)[ \t]*(?P<den>{_DEN}))?"
    r"(?P<pct>[ \t]*%)?)",
    re.I,
)
_BAD_TAIL = re.compile(r"[^\W_]|_[0-9]|[.,][0-9]")  # "0x10", "1_000", "1.2.3" right after a number
_RANGE = re.compile(rf"(?P<lo>[+-]?{_LIT})[ \t]*(?:-|to|\.\.)[ \t]*(?P<hi>[+-]?{_LIT})", re.I)
_TOP = re.compile(rf"(?:out[ \t]+of|/|max(?:imum)?)[ \t]*(?P<top>{_DEN})", re.I)
_TRAILING_SCALE = re.compile(  # "7 (0-10)", "7 on a scale of 0 to 10", "7 (on a 0-10 scale)"
    r"[ \t]*(?:[(\[][ \t]*|(?=on[ \t]|in[ \t]))(?:(?:on|in)[ \t]+(?:a|the)[ \t]+)?"
    r"(?:(?:scale|range)[ \t]+(?:(?:of|from)[ \t]+)?)?(?:from[ \t]+)?"
    rf"(?P<lo>[+-]?{_LIT})[ \t]*(?:-|to|\.\.)[ \t]*(?P<hi>[+-]?{_LIT})(?:[ \t]+scale)?[ \t]*[)\]]?",
    re.I,
)
_CLOSING = re.compile(r"[ \t]*(?:[*_`\"'\])>][ \t]*)*")
_LETTER = re.compile(r"[^\W\d_]")
_CLEAN_WORD = re.compile(  # words that may follow a score value without making it prose
    r"(?:because|since|as|given|due|on|overall|points?|pts?|reason(?:ing)?|justification|explanation"
    r"|rationale|identified|object|region|score|final)\b",
    re.I,
)

Scale = tuple[float | None, float]
"""An explicit scale written in the answer: (low, high), or (None, top) for "a/top", "out of top"."""


class Reading(NamedTuple):
    """One score value read: ``score`` on [-1, 1] or None, codes, and whether it sits in prose."""

    score: float | None
    codes: tuple[str, ...] = ()
    prose: bool = False


NO_NUMBER = Reading(None)


class JsonNumber(float):
    """A JSON number as written: the float value (+-inf when huge, never an int) and ``text``."""

    __slots__ = ("text",)
    text: str

    def __new__(cls, text: str) -> JsonNumber:
        obj = super().__new__(cls, text)  # float() of any numeric literal is finite, inf or nan
        obj.text = text
        return obj


def _float(lit: str, codes: list[str]) -> float:
    """Value of a literal from :data:`_LIT`; a decimal comma is read as a point."""
    if "," in lit:
        whole, frac = lit.split(",", 1)
        codes.append(W_DECIMAL_COMMA)
        if len(frac) == 3 and frac.isdigit() and whole.strip("0"):
            codes.append(W_AMBIGUOUS_NUMBER)  # "1,000": 1.0, or 1000 with a thousands separator
        lit = lit.replace(",", ".")
    return float(lit)


def _scaled(x: float, scale: Scale) -> tuple[float, tuple[str, ...]] | None:
    """``x`` on an explicit scale mapped to [-1, 1] (before clamping); None if the scale is unusable."""
    lo, hi = scale
    if not math.isfinite(hi) or (lo is not None and not math.isfinite(lo)):
        return None
    if lo is None:
        if hi <= 0:
            return None
        return (x, ()) if hi == 1 else (x / hi, (W_OTHER_SCALE,))
    if lo >= hi:
        return None
    if (lo, hi) == (-1.0, 1.0):
        return x, ()
    if (lo, hi) == (-10.0, 10.0):
        return x / 10, ()
    return (2 * x - lo - hi) / (hi - lo), (W_OTHER_SCALE,)


def _implicit(x: float, scale: str, has_point: bool) -> tuple[float, tuple[str, ...]]:
    """A bare number on the prompt's scale: the other prompt's scale is the fallback reading."""
    if scale == UNIT:
        return (x, ()) if abs(x) <= 1 else (x / 10, (W_OTHER_SCALE,))
    if abs(x) < 1 and not x.is_integer():
        return x, ()  # tenths are integers: 0.7 can only be meant on [-1, 1]
    if abs(x) == 1 and has_point:
        return x / 10, (W_OTHER_SCALE,)  # "1.0" under a tenths prompt: 0.1, or 1.0 on [-1, 1]?
    return x / 10, ()


def label_scale(paren: str | None) -> Scale | None:
    """Scale stated in a label's parenthetical: "(0-10)", "(from -1.0 to 1.0)", "(out of 10)"."""
    if not paren:
        return None
    if (m := _RANGE.search(paren)) is not None:
        return float(m["lo"].replace(",", ".")), float(m["hi"].replace(",", "."))
    if (m := _TOP.search(paren)) is not None:
        return None, float(m["top"])
    return None


def _after(value: str, end: int) -> tuple[bool, bool]:
    """What follows the number ``value[:end]`` on its line: (a sentence word, another digit)."""
    pos = _CLOSING.match(value, end).end()  # type: ignore[union-attr]  # always matches
    word = _LETTER.match(value, pos) is not None and _CLEAN_WORD.match(value, pos) is None
    return word, value[pos : pos + 1].isdigit()


def read_number(value: str, scale: str, declared: Scale | None = None) -> Reading:
    """Read the score at the start of ``value`` (a field's text after its label, or a JSON value).

    ``scale`` is the prompt's (``UNIT`` or ``TENTHS``); ``declared`` a scale written in the label.
    """
    m = _VALUE.match(value)
    if m is None:
        return NO_NUMBER
    if m["nonfinite"]:
        return Reading(None, (W_NONFINITE,))
    end = m.end()
    if _BAD_TAIL.match(value, end):
        return Reading(None, (W_BAD_NUMBER,))
    if m["pct"]:
        return Reading(None, (W_PERCENT,))
    codes: list[str] = []
    lit = m["lit"]
    x = _float(lit, codes)
    if m["sign"] == "-":
        x = -x
        if m["gap"]:
            codes.append(W_AMBIGUOUS_NUMBER)  # "- 0.5": a minus, or a dash before the number
    elif m["bullet"] == "-":
        codes.append(W_AMBIGUOUS_NUMBER)  # "Score:\n- 0.5": a list item (read so), or a minus
    explicit: Scale | None = declared
    if m["den"] is not None:
        codes.append(W_FRACTION)
        den = float(m["den"])
        if den == 0:
            return Reading(None, (W_FRACTION, W_NONFINITE))
        if m["slash"] == VULGAR_SLASH:
            x, explicit = x / den, None
        else:
            explicit = (None, den)
    elif (t := _TRAILING_SCALE.match(value, end)) is not None:
        explicit, end = (float(t["lo"].replace(",", ".")), float(t["hi"].replace(",", "."))), t.end()
    mapped = _scaled(x, explicit) if explicit is not None else None
    if mapped is None:
        has_point = m["den"] is not None or any(c in lit for c in ".,eE")
        mapped = _implicit(x, scale, has_point)
    y, more = mapped
    codes.extend(more)
    if math.isnan(y):
        return Reading(None, (W_NONFINITE,))
    if abs(y) > 1:
        y = math.copysign(1.0, y)
        codes.append(W_CLAMPED)
    prose, digit = _after(value, end)
    if digit:
        codes.append(W_AMBIGUOUS_NUMBER)  # "0. 5", "0.8 0.9": which number?
    return Reading(y + 0.0, tuple(codes), prose)  # + 0.0 turns -0.0 into 0.0


__all__ = ["NO_NUMBER", "TENTHS", "UNIT", "JsonNumber", "Reading", "Scale", "label_scale", "read_number"]
