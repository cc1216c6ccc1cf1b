"""Worst-case time of the judge-answer parsers (rewards/parse.py) on ~1 MB adversarial inputs.

Run: ``python bench/parse_worst_case.py``. For every public parser and every input it keeps the
fastest of a few runs (the parser's own time, without scheduler noise), prints the slowest input
per parser, and ends with ``RESULT parse_worst_case_seconds <max> target=0.5 ok=<true|false>``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards import parse as P  # noqa: E402

SIZE = 1_000_000
TARGET_S = 0.5
REPEATS = 3
IDS = list(range(1, 17))


def fill(unit: str, head: str = "", tail: str = "", size: int = SIZE) -> str:
    """``head`` + ``unit`` repeated to about ``size`` characters + ``tail``."""
    return head + unit * max(1, (size - len(head) - len(tail)) // len(unit)) + tail


def chunks(head: str, unit: str, tail: str = "") -> str:
    """Chunks of just under MAX_INPUT_CHARS (head + units + tail) up to SIZE: the parsed tail holds
    one whole chunk, so structures that start with ``head`` survive the truncation."""
    chunk = fill(unit, head, tail, P.MAX_INPUT_CHARS - 1_000)
    return chunk * (SIZE // len(chunk))


def inputs() -> dict[str, str]:
    block = "Region ID: 3\nIdentified Object: a dog\nScore: 0.5\nReason: fine\n---\n"
    item = '{"id": 3, "score": 5, "reason": "r"}, '
    return {
        "many score lines": fill("Score: 0.1\nReason: r\n"),
        "many labels, no values": fill("Score:"),
        "many conflicting labels": fill("Final Score: 0.9\nScore: -0.3\n"),
        "one line of mid-line labels": fill(" Score: 0.1 Reason: x"),
        "many numbers": fill("0.5 "),
        "one long number": chunks("Score: ", "9", "\n"),
        "decimal commas": chunks("Score: ", "0,", "\n"),
        "fractions": fill("1/2/3/"),
        "deep list nesting": fill("["),
        "deep object nesting": fill('{"a":'),
        "many braces": fill("{"),
        "many object starts": fill('{"'),
        "many score keys": fill('{"score": '),
        "unterminated JSON string": chunks('{"score": 7, "reason": "', "x"),
        "valid regions JSON": chunks('{"regions": [', item, '{"id": 1}]}'),
        "valid grounding JSON": chunks("[", '{"label": "a", "box": [1, 2, 30, 40]}, ', "{}]"),
        "many region headers": fill("Region ID: 1\n"),
        "region headers on one line": fill("Region 1: "),
        "mid-line region headers": fill(" Region ID: 2 Score: 0.5", "Region ID: 1"),
        "many region blocks": fill(block),
        "one long region id": chunks("Region ID: ", "1", "\n"),
        "long line of spaces after Score": chunks("Score", " ", "x\n"),
        "long line of spaces after Region": chunks("Region", " ", "x\n"),
        "long line, no newline": fill("a"),
        "many think opens": fill("<think>"),
        "many think closes": fill("</think>"),
        "unclosed think": chunks("<think>", "Score: 0.9 would be too high since "),
        "emphasis stars": fill("*"),
        "backticks": fill("`"),
        "many fences": fill("```"),
        "unclosed fence": chunks("```json\n", '{"score": '),
        "parentheses": fill("Score ("),
        "bullets": fill("\n- "),
        "zero-width spaces": fill("\u200b"),
        "control characters": fill("\x00\x07\x1b[1m"),
        "NFKC expansion": fill("\ufdfa"),
        "full-width digits": fill("\uff10.\uff17 ", "Score: "),
        "quoted lines": fill("> Score: 1\n"),
    }


def parsers() -> dict[str, Callable[[str], object]]:
    return {
        "parse_score_text": P.parse_score_text,
        "parse_score_json": P.parse_score_json,
        "parse_regions_text": lambda t: P.parse_regions_text(t, IDS),
        "parse_regions_json": lambda t: P.parse_regions_json(t, IDS),
        "parse_grounding_json": lambda t: P.parse_grounding_json(t, 1024, 1024),
    }


def best_time(fn: Callable[[str], object], text: str) -> float:
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn(text)
        runs.append(time.perf_counter() - t0)
    return min(runs)


def main() -> int:
    cases = inputs()
    worst = 0.0
    for name, fn in parsers().items():
        times = {label: best_time(fn, text) for label, text in cases.items()}
        slowest = max(times, key=times.__getitem__)
        worst = max(worst, times[slowest])
        print(f"{name:22s} worst {times[slowest]:.3f} s on {slowest!r} ({len(cases[slowest]):,} chars)")
    print(f"RESULT parse_worst_case_seconds {worst:.3f} target={TARGET_S} ok={'true' if worst < TARGET_S else 'false'}")
    return 0 if worst < TARGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
