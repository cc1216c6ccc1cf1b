"""Prompt sources: plain text, T2I-CompBench JSON and GenEval JSONL, loaded into ``PromptRecord``s.

Formats (``format=``):
- ``txt``: one prompt per line; blank lines are skipped; lines whose first non-space character is
  ``#`` are comments. id = 1-based line number, no category.
- ``t2i_compbench``: a JSON list of objects ``{"Question", "Category", "Question_id"}``.
  id = ``str(Question_id)`` when present, else the 0-based list index; category = ``Category``.
- ``geneval``: JSON Lines, one object per line with a ``prompt`` field (GenEval's
  ``evaluation_metadata.jsonl``); id = 1-based line number; category = ``tag``.
- ``auto``: by extension (.txt, .json, .jsonl); for .json/.jsonl and for other extensions the first
  non-space character decides between a JSON list (``[``) and JSON Lines (``{``). An unknown
  extension whose content is neither is an error (pass ``format="txt"``) rather than a guess.

Every problem raises ``PromptSourceError`` naming the file and the line, entry index or byte offset.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "FORMATS", "PromptCycler", "PromptRecord", "PromptSourceError", "detect_format", "load_prompt_source", "load_prompts",
    "resolve_prompt_path",
]

Format = Literal["auto", "txt", "t2i_compbench", "geneval"]
FORMATS: tuple[str, ...] = ("auto", "txt", "t2i_compbench", "geneval")
EXTENSIONS: dict[str, str] = {".txt": "txt", ".json": "t2i_compbench", ".jsonl": "geneval"}
REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_PROMPT_CHARS = 2_000  # longer is no prompt (text encoders read at most a few hundred tokens)


class PromptSourceError(ValueError):
    """A prompt file that cannot be used; the message names the file and where the problem is."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"prompt source {self.path}: {problem}")


class PromptRecord(BaseModel):
    """One prompt: a stable id within its file, the text, and an optional category."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    text: str
    category: str | None = None


def _read_text(path: Path) -> str:
    if not path.exists():
        raise PromptSourceError(path, "file not found")
    if not path.is_file():
        raise PromptSourceError(path, "not a regular file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        start = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:start].count(b"\n") + 1
        raise PromptSourceError(
            path, f"not UTF-8 text: invalid byte 0x{data[start]:02x} at byte offset {start} (line {line})"
        ) from None
    if not text.strip():
        raise PromptSourceError(path, "file is empty")
    return text


def detect_format(path: str | Path, text: str | None = None) -> str:
    """Format of a file for ``format="auto"``: by extension, then by the first non-space character."""
    path = Path(path)
    ext = path.suffix.lower()
    if text is None:
        text = _read_text(path)
    first = text.lstrip()[:1]
    if ext == ".txt":
        return "txt"
    if first == "[":
        return "t2i_compbench"
    if first == "{":
        return "geneval"
    if ext in EXTENSIONS:
        raise PromptSourceError(path, f"a {ext} file must start with '[' (JSON list) or '{{' (JSON Lines), got {first!r}")
    raise PromptSourceError(
        path,
        f"unknown extension {ext or '(none)'!r}: use one of {', '.join(EXTENSIONS)} or pass format= one of "
        f"{', '.join(FORMATS[1:])}",
    )


def _parse_txt(path: Path, text: str) -> list[PromptRecord]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if s and not s.startswith("#"):
            records.append(PromptRecord(id=str(lineno), text=_checked(path, s, f"line {lineno}")))
    return records


def _checked(path: Path, text: str, where: str) -> str:
    """A prompt as given, or an error naming where it is: control characters (a NUL byte is a binary
    file, not a prompt) and prompts over :data:`MAX_PROMPT_CHARS` are refused, never cut or cleaned."""
    bad = next((c for c in text if unicodedata.category(c) == "Cc" and c != "\t"), None)
    if bad is not None:
        raise PromptSourceError(path, f"{where}: control character U+{ord(bad):04X} in the prompt")
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptSourceError(path, f"{where}: prompt of {len(text)} characters (at most {MAX_PROMPT_CHARS})")
    return text


def _prompt_text(path: Path, value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise PromptSourceError(path, f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise PromptSourceError(path, f"{where}: empty prompt in field {field!r}")
    return _checked(path, text, where)


def _category(path: Path, value: Any, where: str, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise PromptSourceError(path, f"{where}: field {field!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _parse_t2i_compbench(path: Path, text: str) -> list[PromptRecord]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptSourceError(path, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(data, list):
        raise PromptSourceError(
            path, f"expected a JSON list of {{'Question', 'Category', 'Question_id'}} objects, got {type(data).__name__}"
        )
    records = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(data):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            raise PromptSourceError(path, f"{where}: expected an object with 'Question', got {type(entry).__name__}")
        if "Question" not in entry:
            raise PromptSourceError(path, f"{where}: missing field 'Question' (has: {', '.join(map(str, entry)) or 'nothing'})")
        qid = entry.get("Question_id")
        if isinstance(qid, (dict, list, bool)):
            raise PromptSourceError(path, f"{where}: 'Question_id' must be an integer or string, got {qid!r}")
        rid = str(i) if qid is None else str(qid).strip()
        if rid in seen:
            raise PromptSourceError(path, f"{where}: duplicate Question_id {rid!r} (first at entry {seen[rid]})")
        seen[rid] = i
        records.append(
            PromptRecord(
                id=rid,
                text=_prompt_text(path, entry["Question"], where, "Question"),
                category=_category(path, entry.get("Category"), where, "Category"),
            )
        )
    return records


def _parse_geneval(path: Path, text: str) -> list[PromptRecord]:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSourceError(path, f"invalid JSON at line {lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(entry, dict):
            raise PromptSourceError(path, f"{where}: expected a JSON object with 'prompt', got {type(entry).__name__}")
        if "prompt" not in entry:
            raise PromptSourceError(path, f"{where}: missing field 'prompt' (has: {', '.join(map(str, entry)) or 'nothing'})")
        records.append(
            PromptRecord(
                id=str(lineno),
                text=_prompt_text(path, entry["prompt"], where, "prompt"),
                category=_category(path, entry.get("tag"), where, "tag"),
            )
        )
    return records


_PARSERS = {"txt": _parse_txt, "t2i_compbench": _parse_t2i_compbench, "geneval": _parse_geneval}


def _filter_categories(path: Path, records: list[PromptRecord], categories: Iterable[str]) -> list[PromptRecord]:
    wanted = list(dict.fromkeys(categories))
    if not wanted:
        raise PromptSourceError(path, "categories filter is empty; pass None to keep every category")
    available = sorted({r.category for r in records if r.category is not None})
    unknown = [c for c in wanted if c not in available]
    if unknown:
        listing = ", ".join(available) if available else "none (this file has no categories)"
        raise PromptSourceError(path, f"unknown categories {unknown}; available: {listing}")
    keep = set(wanted)
    return [r for r in records if r.category in keep]


def load_prompts(
    path: str | Path,
    format: str = "auto",  # noqa: A002 - the config field's name
    categories: Sequence[str] | None = None,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Load prompts from ``path`` in file order; keep ``categories`` (all must exist), then the first ``limit``.

    Raises PromptSourceError for a missing, empty or non-UTF-8 file, invalid JSON, a missing or empty
    prompt field, an unknown format or extension, a category not in the file, or no prompts at all.
    """
    path = Path(path)
    if format not in FORMATS:
        raise PromptSourceError(path, f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise PromptSourceError(path, f"limit must be a positive integer or None, got {limit!r}")
    if isinstance(categories, str):
        categories = [categories]
    text = _read_text(path)
    fmt = detect_format(path, text) if format == "auto" else format
    records = _PARSERS[fmt](path, text)
    if not records:
        raise PromptSourceError(path, f"no prompts found (format {fmt!r}; comments and blank lines do not count)")
    if categories is not None:
        records = _filter_categories(path, records, categories)
    return records[:limit] if limit is not None else records


def resolve_prompt_path(path: str | Path, base_dirs: Sequence[str | Path] | None = None) -> Path:
    """Absolute paths as they are; relative ones against the working dir, then the repo root.

    Returns the first candidate that exists, else the working-dir candidate (so errors name it).
    """
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    bases = [Path.cwd(), REPO_ROOT] if base_dirs is None else [Path(b) for b in base_dirs]
    for base in bases:
        if (base / p).exists():
            return base / p
    return (bases[0] if bases else Path.cwd()) / p


def load_prompt_source(source: Any, base_dirs: Sequence[str | Path] | None = None) -> list[PromptRecord]:
    """Load a ``PromptSourceConfig`` with a file path: resolve the path, filter, limit (file order;
    :class:`PromptCycler` does the one shuffle)."""
    if source.path is None:
        raise PromptSourceError("(none)", "cluster.prompts.path is null: the world's own prompts come from the "
                                "composition root, not from a file")
    return load_prompts(resolve_prompt_path(source.path, base_dirs), source.format, source.categories, source.limit)


class PromptCycler:
    """Endless walk over a prompt set, in a fresh seeded order each epoch (file order when ``shuffle`` is
    off), with a unique generation seed per image (``seed * 1_000_003`` onwards).

    Each epoch's order is a function of ``(seed, epoch)`` alone, so the whole position in the stream is
    three numbers (:meth:`state`): a resumed run continues the stream (:meth:`restore`) instead of
    replaying it."""

    def __init__(self, prompts: Sequence[PromptRecord], seed: int, shuffle: bool = True):
        if not prompts:
            raise ValueError("PromptCycler needs at least one prompt")
        self.prompts, self.seed, self.shuffle = list(prompts), seed, shuffle
        self.epoch, self.position, self.counter = 0, 0, seed * 1_000_003
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[PromptRecord]:
        order = list(self.prompts)
        if self.shuffle:
            random.Random(f"srum-prompts-{self.seed}-{epoch}").shuffle(order)
        return order

    def take(self, n: int) -> tuple[list[PromptRecord], list[int]]:
        """The next ``n`` prompts and their seeds."""
        out = []
        while len(out) < n:
            if self.position >= len(self.order):
                self.epoch, self.position = self.epoch + 1, 0
                self.order = self._order(self.epoch)
            out.append(self.order[self.position])
            self.position += 1
        seeds = list(range(self.counter, self.counter + n))
        self.counter += n
        return out, seeds

    def state(self) -> dict[str, int]:
        """Where the walk stands (JSON data)."""
        return {"epoch": self.epoch, "position": self.position, "counter": self.counter,
                "prompts": len(self.prompts)}

    def restore(self, state: dict[str, int]) -> None:
        """Continue from :meth:`state`; a prompt set of another size cannot continue a walk (ValueError)."""
        if state.get("prompts") != len(self.prompts):
            raise ValueError(f"the saved prompt walk is over {state.get('prompts')} prompts, this set has "
                             f"{len(self.prompts)}: the prompt source changed since the checkpoint")
        self.epoch, self.position, self.counter = int(state["epoch"]), int(state["position"]), int(state["counter"])
        self.order = self._order(self.epoch)
