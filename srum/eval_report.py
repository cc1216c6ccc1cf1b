"""The HTML report of `srum eval`: per-category scores of each evaluated model with 95% intervals, and, for
two or more models, each one's difference from the first (the baseline) with its paired 95% interval; then
the images, prompt by prompt and model beside model, each with its grade and the evaluator's reason.

Plain HTML with relative links to the saved PNGs (the report and ``images/`` travel together); every text
from a prompt file or a judge is escaped.
"""

from __future__ import annotations

import html
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.eval_records import EvalImageRecord

__all__ = ["write_report"]

STYLE = """
body{font-family:sans-serif;background:#fafafa;margin:16px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:right}th{background:#eee}
td.l,th.l{text-align:left}.up{background:#dff5df}.down{background:#f8dede}
.p{background:#fff;border:1px solid #ddd;margin:8px 0;padding:6px}.row{display:flex;gap:6px;margin:4px 0}
.m{width:110px;font-size:12px;font-weight:bold}.im{width:170px;font-size:11px}.im img{width:160px;
image-rendering:pixelated;display:block}.bad{color:#a00}
"""


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ci(ci: Sequence[float] | None, signed: bool = False) -> str:
    if not ci:
        return ""
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f" [{fmt.format(100 * ci[0])}, {fmt.format(100 * ci[1])}]"


def _score_table(models: Sequence[str], summaries: Mapping[str, dict[str, Any]],
                 comparisons: Mapping[str, dict[str, Any]], scale: str) -> str:
    cats = sorted({c for s in summaries.values() for c in s["categories"]})
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    head += "".join(f"<th>{html.escape(m)} &minus; {html.escape(models[0])}</th>" for m in models[1:])
    rows = []
    for cat in [*cats, None]:
        label = "overall (mean of categories)" if cat is None else cat
        cells = []
        for m in models:
            s = summaries[m] if cat is None else summaries[m]["categories"].get(cat, {})
            score = s.get("overall") if cat is None else s.get("score")
            n = s.get("n", 0)
            failed = s.get("failed", 0)
            extra = f" <span class='bad'>({failed} failed)</span>" if failed else ""
            cells.append(f"<td>{_pct(score)}{_ci(s.get('ci'))} <small>n={n}</small>{extra}</td>")
        for m in models[1:]:
            comp = comparisons[m]["overall"] if cat is None else comparisons[m]["categories"].get(cat, {})
            delta, ci = comp.get("delta"), comp.get("ci")
            cls = "up" if ci and ci[0] > 0 else ("down" if ci and ci[1] < 0 else "")
            text = "-" if delta is None else f"{100 * delta:+.1f}{_ci(ci, signed=True)}"
            cells.append(f"<td class='{cls}'>{text} <small>{comp.get('prompts', 0)} prompts</small></td>")
        rows.append(f"<tr><td class='l'>{html.escape(label)}</td>{''.join(cells)}</tr>")
    return (f"<p>Scores: {html.escape(scale)}, 95% bootstrap intervals over prompts; differences are paired "
            "(same prompts and seeds), green/red where the interval excludes 0.</p>"
            f"<table><tr><th class='l'>category</th>{head}</tr>{''.join(rows)}</table>")


def _image_cell(r: EvalImageRecord) -> str:
    grade = "failed" if r.score is None else (f"{r.grade}" if r.grade is not None else _pct(r.score))
    why = r.explanation if r.score is not None else f"{r.outcome}: {r.error or ''}"
    img = f"<img src='{html.escape(r.image)}' alt=''>" if r.image else ""
    cls = " bad" if r.score is None else ""
    return (f"<div class='im'>{img}<b class='{cls.strip()}'>{html.escape(grade)}</b> "
            f"<span title='{html.escape(why)}'>{html.escape(why[:140])}</span></div>")


def _gallery(models: Sequence[str], records: Mapping[str, Sequence[EvalImageRecord]], per_category: int) -> str:
    by_prompt: dict[str, dict[str, dict[str, list[EvalImageRecord]]]] = defaultdict(lambda: defaultdict(dict))
    order: dict[str, list[str]] = defaultdict(list)
    for m in models:
        for r in records[m]:
            slot = by_prompt[r.category].setdefault(r.prompt_id, {})
            if r.prompt_id not in order[r.category]:
                order[r.category].append(r.prompt_id)
            slot.setdefault(m, []).append(r)
    parts = []
    for cat in sorted(order):
        ids = order[cat]
        parts.append(f"<h3>{html.escape(cat)} ({len(ids)} prompts"
                     + (f", first {per_category} shown" if len(ids) > per_category else "") + ")</h3>")
        for pid in ids[:per_category]:
            slot = by_prompt[cat][pid]
            text = next(iter(slot.values()))[0].prompt
            rows = "".join(
                f"<div class='row'><div class='m'>{html.escape(m)}</div>"
                + "".join(_image_cell(r) for r in sorted(slot.get(m, []), key=lambda r: r.index)) + "</div>"
                for m in models)
            parts.append(f"<div class='p'><div>{html.escape(pid)}: {html.escape(text)}</div>{rows}</div>")
    return "".join(parts)


def write_report(path: str | Path, *, models: Sequence[str], summaries: Mapping[str, dict[str, Any]],
                 comparisons: Mapping[str, dict[str, Any]], records: Mapping[str, Sequence[EvalImageRecord]],
                 info: Mapping[str, Any], per_category: int = 50) -> Path:
    """Write ``report.html`` (see the module docstring); returns its path."""
    path = Path(path)
    meta = "".join(f"<tr><td class='l'>{html.escape(str(k))}</td><td class='l'>{html.escape(str(v))}</td></tr>"
                   for k, v in info.items())
    page = (f"<!doctype html><meta charset='utf-8'><title>srum eval</title><style>{STYLE}</style>"
            f"<h2>srum eval: {' vs '.join(html.escape(m) for m in models)}</h2><table>{meta}</table>"
            + _score_table(models, summaries, comparisons, str(info.get("scale", "")))
            + "<h2>Images</h2>" + _gallery(models, records, per_category))
    path.write_text(page, encoding="utf-8")
    return path
