"""Text grammar of judge answers: normalisation, think blocks, fields, region headers, one score per
block. The rules are written in :mod:`rewards.parse`'s docstring; this module only implements them.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from typing import Any, NamedTuple

from rewards.parse_codes import (
    MAX_ID_DIGITS,
    MAX_INPUT_CHARS,
    MAX_OBJECT_CHARS,
    MAX_REASON_CHARS,
    W_AMBIGUOUS_SCORES,
    W_EMPTY,
    W_MULTIPLE_SCORES,
    W_NO_REASON,
    W_NOT_TEXT,
    W_PROSE_SCORE,
    W_TRUNCATED,
    W_UNCLOSED_THINK,
)
from rewards.parse_numbers import Reading, label_scale, read_number

# ----- normalisation and think blocks -----

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # terminal colour / cursor sequences
_LINE_BREAKS = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_CONTROLS = re.compile(r"[\x00-\x08\x0e-\x1b\x1f\x7f-\x84\x86-\x9f]")
_INVISIBLE = re.compile("[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]")
_MINUS_LIKE = re.compile(r"[\u2212\u2010\u2011\u2012\u2013\ufe63](?=[ \t]?\.?[0-9])")  # not the em dash
_THINK_TAG = re.compile(r"<(?P<close>/)?think(?:ing)?>", re.I)


class Prepared(NamedTuple):
    """A normalised answer and where its think blocks are."""

    text: str  # normalised, think tags still in (JSON is decoded from here)
    answer: str  # the text outside think blocks, up to an unclosed <think>
    inside: str | None  # the text after an unclosed <think>, None when every block is closed
    closed: tuple[tuple[int, int], ...]  # closed think blocks [start, end) in ``text``
    stray_end: int  # end of the last unmatched </think>; everything before it is thinking
    open_at: int | None  # start of the unclosed <think>
    codes: tuple[str, ...]  # answer-level codes (truncated, unclosed_think)


def _normalise(text: str) -> str:
    text = _INVISIBLE.sub("", _CONTROLS.sub(" ", _LINE_BREAKS.sub("\n", _ANSI.sub("", text))))
    return _MINUS_LIKE.sub("-", unicodedata.normalize("NFKC", text))


def prepare(raw: Any) -> tuple[Prepared | None, tuple[str, ...]]:
    """Coerce, truncate (once, keeping the tail), normalise and locate think blocks."""
    if not isinstance(raw, str):
        return None, (W_NOT_TEXT,)
    text = _normalise(raw[-MAX_INPUT_CHARS:])
    truncated = len(raw) > MAX_INPUT_CHARS or len(text) > MAX_INPUT_CHARS  # NFKC: "ﷺ" is 18 characters
    text = text[-MAX_INPUT_CHARS:]
    codes = [W_TRUNCATED] if truncated else []
    closed: list[tuple[int, int]] = []
    stray_end, open_at, open_end = 0, None, 0
    for m in _THINK_TAG.finditer(text):
        if m["close"] is None:
            if open_at is None:
                open_at, open_end = m.start(), m.end()
        elif open_at is None:
            stray_end = m.end()  # the chat template opened the block
        else:
            closed.append((open_at, m.end()))
            open_at = None
    parts, pos = [], stray_end
    for a, b in closed:
        if a >= stray_end:
            parts += [text[pos:a], "\n"]
            pos = b
    parts.append(text[pos : open_at if open_at is not None else len(text)])
    answer = "".join(parts)
    inside = text[open_end:] if open_at is not None else None
    if open_at is not None:
        codes.append(W_UNCLOSED_THINK)
    if not answer.strip() and not (inside or "").strip():
        return None, (*codes, W_EMPTY)
    return Prepared(text, answer, inside, tuple(closed), stray_end, open_at, tuple(codes)), tuple(codes)


def json_tier(prep: Prepared, start: int, end: int) -> int | None:
    """Where a JSON value ``text[start:end]`` lies: 0 answer, 1 answer spanning a stray </think>
    (the tag is inside one of its strings), 2 inside an unclosed <think>, None inside thinking."""
    i = bisect.bisect_right(prep.closed, (start, len(prep.text) + 1)) - 1
    if i >= 0 and start < prep.closed[i][1]:
        return None
    if start >= prep.stray_end:
        return 0 if prep.open_at is None or start < prep.open_at else 2
    return 1 if end >= prep.stray_end else None


# ----- fields -----

# Line-start markup: quotes, headings, bullets, emphasis, table pipes, then an optional "1." item.
_LINE_PREFIX = r"^(?P<prefix>[ \t>#*_\-+•·|\[]*(?:[0-9]{1,2}[.)][ \t]+[*_]{0,3})?)"
_SCORE_QUALIFIERS = (
    "final|overall|total|global|layout|composition|relevance|quality|region|sample|image|visual|"
    "aesthetic|alignment|my|the|your|assigned"
)
_FIELD_NAMES = (
    rf"(?P<score>(?:(?:{_SCORE_QUALIFIERS})[ \t]+){{0,3}}scores?)"
    r"|(?P<reason>reason(?:ing)?|justification|explanation|rationale)"
    r"|(?P<object>identified[ \t]+object|object(?:[ \t]+identified)?)"
)
# Label, closing emphasis, optional short scale ("Score (0-10):"), then ':' or '='. Every
# whitespace run is followed by a required token, so failing matches cannot backtrack badly.
_FIELD_SEP = r"[*_`]{0,3}[ \t]*(?:[(\[](?P<paren>[^)\]\n]{0,40})[)\]][ \t]*)?(?:[*_`]{1,3}[ \t]*)?[:=]"
_FIELD_AT_LINE = re.compile(_LINE_PREFIX + rf"(?i:{_FIELD_NAMES})" + _FIELD_SEP, re.M)
_FIELD_MID_LINE = re.compile(  # capitalised, and only after a non-reason field of the same line
    r"(?<=[ \t])[*_]{0,3}(?:(?P<score>(?:Final |Overall )?Score)|(?P<reason>Reason)"
    r"|(?P<object>Identified Object))" + _FIELD_SEP
)
_FIELD_WORD = r"(?i:identified|object|score|reason|final|overall)\b"
_REGION_ID = r"(?P<id>[0-9]+)"
_REGION_AT_LINE = re.compile(
    _LINE_PREFIX + r"(?i:region(?:[ \t]+id)?)[ \t]*(?:[*_]{1,3}[ \t]*)?(?:[:#=][ \t]*)?(?:[*_]{1,3}[ \t]*)?"
    + _REGION_ID
    # What may follow the id (consumed up to the block's first field): closing markup, then a line
    # end, a separator, a parenthetical, a box or a field. "region 2 of the field" is prose.
    + r"[ \t]*(?:[*_`\])][ \t]*)*(?:\([^)\n]{0,60}\)[ \t]*)?"
    r"(?:(?=\n|$)|[:\-\u2013\u2014|#][ \t]*(?:[*_`][ \t]*)*|\.[ \t]*(?=\n|$)"
    rf"|(?=\[|,[ \t]*b?box\b|{_FIELD_WORD}))",
    re.M,
)
_REGION_MID_LINE = re.compile(
    r"(?<=[ \t])[*_]{0,3}Region ID[ \t]*(?:[:#][ \t]*)?" + _REGION_ID
    + rf"[ \t]*(?:[*_`\]):,\-\u2013\u2014][ \t]*)*(?={_FIELD_WORD})"
)
_SEPARATOR_LINE = re.compile(r"^[\s\-=*_~#]*$")


class Field(NamedTuple):
    kind: str  # score / reason / object
    label: str
    paren: str | None  # the label's parenthetical ("0-10" in "Score (0-10):")
    start: int  # where the label starts
    body: int  # where the value starts (it runs to the next kept field)


class Block(NamedTuple):
    """One answer (global / sample) or one region block, read."""

    score: float | None
    codes: tuple[str, ...]
    reason: str
    obj: str | None


def _matches(text: str, *patterns: re.Pattern[str]) -> list[re.Match[str]]:
    """Matches of all patterns in text order; a match overlapping an earlier one is dropped."""
    kept: list[re.Match[str]] = []
    for m in sorted((m for p in patterns for m in p.finditer(text)), key=lambda m: m.start()):
        if not kept or m.start() >= kept[-1].end():
            kept.append(m)
    return kept


def _kind(m: re.Match[str]) -> str:
    return "score" if m["score"] else "reason" if m["reason"] else "object"


def fields(text: str) -> list[Field]:
    """The fields of a block (see the grammar): mid-line labels only after a score or object
    field of the same line; quoted (``>``) fields only when the block's first field is quoted."""
    kept: list[tuple[re.Match[str], bool]] = []
    line, pos, field_line, open_line, quoted = 0, 0, -1, False, False
    for m in _matches(text, _FIELD_AT_LINE, _FIELD_MID_LINE):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        if m.re is _FIELD_AT_LINE:
            field_line, open_line, quoted = line, _kind(m) != "reason", ">" in m["prefix"]
        elif not (line == field_line and open_line):
            continue
        else:
            open_line = _kind(m) != "reason"
        kept.append((m, quoted))
    if kept and not kept[0][1]:
        kept = [(m, q) for m, q in kept if not q]
    return [Field(_kind(m), m[_kind(m)], m["paren"], m.start(), m.end()) for m, _ in kept]


def _values(text: str, fs: list[Field]) -> list[str]:
    """Each field's value: its text up to the next field."""
    ends = [f.start for f in fs[1:]] + [len(text)] if fs else []
    return [text[f.body : end] for f, end in zip(fs, ends, strict=True)]


def clean(value: str, max_chars: int, paragraph: bool = True) -> str:
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


def _rank(label: str) -> int:
    """Priority of a score label: final/overall/total 2, plain 1, sub-score (quality, ...) 0."""
    words = label.lower().split()[:-1]
    if any(w in ("final", "overall", "total") for w in words):
        return 2
    if any(w in ("relevance", "quality", "composition", "visual", "aesthetic", "alignment") for w in words):
        return 0
    return 1


def read_block(text: str, scale: str) -> Block:
    """The block's score, codes, reason and object, by the rules of the grammar."""
    fs = fields(text)
    numeric: list[tuple[int, int, Reading]] = []  # (rank, field index, reading)
    failed: tuple[str, ...] = ()
    for i, (f, value) in enumerate(zip(fs, _values(text, fs), strict=True)):
        if f.kind == "score":
            r = read_number(value, scale, label_scale(f.paren))
            if r.score is None:
                failed = r.codes
            else:
                numeric.append((_rank(f.label), i, r))
    pool = [c for c in numeric if not c[2].prose] or numeric
    if len(pool) < len(numeric):  # prose scores are text of the field they sit in
        dropped = {c[1] for c in numeric} - {c[1] for c in pool}
        keep = [i for i in range(len(fs)) if i not in dropped]
        index = {old: new for new, old in enumerate(keep)}
        fs = [fs[i] for i in keep]
        pool = [(rank, index[i], r) for rank, i, r in pool]
    values = _values(text, fs)
    reasons = [(i, v) for i, (f, v) in enumerate(zip(fs, values, strict=True)) if f.kind == "reason"]
    objects = [v for f, v in zip(fs, values, strict=True) if f.kind == "object"]
    obj = clean(objects[0], MAX_OBJECT_CHARS).split("\n")[0] if objects else None
    codes: list[str] = []
    score: float | None = None
    if pool:
        best = max(c[0] for c in pool)
        top = [c for c in pool if c[0] == best]
        _, chosen, reading = top[-1]  # the model's latest word
        score = reading.score
        codes += reading.codes
        if reading.prose:
            codes.append(W_PROSE_SCORE)
        judged = [c for c in pool if c[0] >= 1] or pool  # sub-scores are parts, not rival answers
        if len({c[2].score for c in judged}) > 1:
            codes.append(W_AMBIGUOUS_SCORES)
        if len(pool) > 1:
            codes.append(W_MULTIPLE_SCORES)
        after = [v for i, v in reasons if i > chosen]
        before = [v for i, v in reasons if i < chosen]
        reason_raw = after[0] if after else before[-1] if before else ""
    else:
        codes += failed
        reason_raw = reasons[-1][1] if reasons else ""
    reason = clean(reason_raw, MAX_REASON_CHARS)
    if not reason:
        codes.append(W_NO_REASON)
    return Block(score, tuple(codes), reason, obj or None)


def region_blocks(text: str) -> list[tuple[int | None, str]] | None:
    """(id, block text) per region header in answer order; id None when too long. None: no header."""
    kept = _matches(text, _REGION_AT_LINE, _REGION_MID_LINE)
    if not kept:
        return None
    out: list[tuple[int | None, str]] = []
    for i, m in enumerate(kept):
        end = kept[i + 1].start() if i + 1 < len(kept) else len(text)
        digits = m["id"]
        out.append((int(digits) if len(digits) <= MAX_ID_DIGITS else None, text[m.end() : end]))
    return out
