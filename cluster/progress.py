"""What a person watches while a run goes: a live progress line, `metrics.jsonl`, loss/reward plots
and an HTML gallery of recent samples (image, proposed boxes with their region scores, reward heat-map).

Everything here is driver-side and plain Python: no Ray, no model math. The progress line is printed
when something it shows changed (not the same line every second while the learner evaluates);
``curves.png`` and ``gallery.html`` are rewritten by the driver every ``run.refresh_every`` steps.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

import numpy as np
from PIL import Image, ImageDraw

from core.records import DropReason, Region, SampleRecord

PLOT_KEYS = (
    ("loss", "learner loss"),
    ("l_r", "reward-weighted term L_r"),
    ("mean_global_score", "mean global score"),
    ("mean_alpha", "mean alpha"),
)
# the progress line is printed again only when one of these changed (rates alone do not count)
CHANGE_KEYS = ("step", "images", "trained", "buffer_size", "policy_version", "max_lag", "judge_failed", "judge_unread",
               "num_samplers", "num_scorers", "stop_reason")
UNREADABLE_MIN = 64  # judged samples before a judge whose answers cannot be read is reported
REASON_CHARS = 160  # a region's reason as the gallery shows it


def format_progress(status: dict[str, Any]) -> str:
    """One line: steps, images/s, samples trained/s, mean global score, buffer, lag, judge health."""

    def num(key: str, fmt: str = "{:.2f}") -> str:
        value = status.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return fmt.format(value)

    return (
        f"step {num('step', '{:d}')}/{num('max_steps', '{:d}')} | "
        f"img/s {num('images_per_s')} | trained/s {num('trained_per_s')} | "
        f"g {num('mean_global_score', '{:+.2f}')} | loss {num('loss', '{:.4f}')} | "
        f"buffer {num('buffer_size', '{:d}')} | v{num('policy_version', '{:d}')} "
        f"lag {num('max_lag', '{:d}')} | judge fail {num('judge_failed', '{:d}')} unread {num('judge_unread', '{:d}')} | "
        f"samplers {num('num_samplers', '{:d}')} scorers {num('num_scorers', '{:d}')}"
    )


def format_eval(result: dict[str, Any]) -> str:
    """One line for a held-out evaluation: accuracy over all images (and how many), its mean over the
    categories when there are several (GenEval's overall: a category with many prompts does not dominate it),
    and each category's."""
    by_cat = {k: v for k, v in result.items() if k not in ("overall", "n", "step", "policy_version", "eval_seconds")}
    cats = ", ".join(f"{k} {100 * v:.0f}%" for k, v in by_cat.items())
    n = f" of {int(result['n'])} images" if result.get("n") else ""
    macro = f", {100 * sum(by_cat.values()) / len(by_cat):.1f}% averaged over categories" if len(by_cat) > 1 else ""
    return f"srum: held-out accuracy at step {result['step']}: {100 * result['overall']:.1f}%{n}{macro}" + (
        f" ({cats})" if cats else "")


def unreadable_judge_warning(buffer_stats: dict[str, Any], judge_mode: str, min_judged: int = UNREADABLE_MIN) -> str | None:
    """The warning for a judge whose answers carry no readable global score (a model that ignores the format,
    the wrong ``judge.mode``): at least ``min_judged`` samples, 90 % of them unread. None otherwise."""
    unread = buffer_stats["dropped"].get(DropReason.NO_GLOBAL_SCORE.value, 0)
    generated = buffer_stats["generated"]
    if generated < min_judged or unread < 0.9 * generated:
        return None
    return (f"srum: WARNING: {unread} of the {generated} samples judged so far had no readable global score "
            f"(judge.mode={judge_mode}): nothing to train on; see the judge counters (parse_failed, ambiguous) "
            "in `srum status` and the judge's answers in the gallery")


class ProgressReporter:
    """Prints the live line (rewritten in place on a TTY, one line per report otherwise) and appends every
    record to `metrics.jsonl` in the run directory."""

    def __init__(self, run_dir: str | Path, stream: TextIO | None = None, min_interval_s: float = 1.0):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.stream = stream or sys.stdout
        self.min_interval_s = min_interval_s
        self._last_print = 0.0
        self._last_key: tuple[Any, ...] | None = None
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON record (a learner step, a status snapshot, an event) to metrics.jsonl."""
        record = {"time": time.time(), **record}
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")

    def show(self, status: dict[str, Any], force: bool = False) -> bool:
        """Print the line when a :data:`CHANGE_KEYS` value changed (at most every ``min_interval_s``) or
        when forced; returns whether it printed."""
        now = time.monotonic()
        key = tuple(status.get(k) for k in CHANGE_KEYS)
        if not force and (now - self._last_print < self.min_interval_s or key == self._last_key):
            return False
        self._last_print, self._last_key = now, key
        line = format_progress(status)
        if self._tty:
            self.stream.write("\r\x1b[2K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        return True

    def close(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl; a torn last line (crash mid-write) is skipped, not an error."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_metrics(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Loss and reward curves over learner steps from metrics.jsonl, as one PNG. None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    # after a learner restart the rolled-back steps are trained again: each step's last record counts
    last = {r["step"]: r for r in records if r.get("kind") == "train" and "step" in r}
    rows = [last[k] for k in sorted(last)]
    if not rows:
        return None
    evals = [r for r in records if r.get("kind") == "eval"]
    keys = [*PLOT_KEYS, ("overall", "held-out accuracy")] if evals else list(PLOT_KEYS)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, (key, title) in zip(axes, keys, strict=True):
        if key == "overall":
            ax.plot([r["step"] for r in evals], [100 * r["overall"] for r in evals], "o-", lw=2)
            ax.set_title(title + " (%)")
            ax.set_xlabel("learner step")
            continue
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            steps, values = zip(*pts, strict=True)
            ax.plot(steps, values, lw=1)
            if len(values) >= 10:
                k = max(2, len(values) // 10)
                smooth = np.convolve(values, np.ones(k) / k, mode="valid")
                ax.plot(steps[k - 1 :], smooth, lw=2)
        ax.set_title(title)
        ax.set_xlabel("learner step")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


class Gallery:
    """Keeps the most recent samples and writes `gallery.html`: what the judge saw and how it scored it."""

    def __init__(self, run_dir: str | Path, keep: int = 24):
        self.path = Path(run_dir) / "gallery.html"
        self.items: deque[dict[str, Any]] = deque(maxlen=keep)

    def add(self, image: np.ndarray, record: SampleRecord, reward_map: np.ndarray | None, stride: int = 1) -> None:
        """image: uint8 HxWx3, shrunk by ``stride`` from the judged image (the record's boxes are in
        full-image pixels); reward_map: R at the image's resolution (any range) or None."""
        self.items.append({"image": np.asarray(image), "record": record, "R": reward_map, "stride": stride})

    def write(self) -> Path:
        cards = [self._card(item) for item in reversed(self.items)]
        page = (
            "<!doctype html><meta charset='utf-8'><title>srum gallery</title>"
            "<style>body{font-family:sans-serif;background:#fafafa}.c{display:inline-block;vertical-align:top;"
            "width:430px;margin:6px;padding:6px;background:#fff;border:1px solid #ddd}img{width:200px;"
            "image-rendering:pixelated;margin-right:4px}td{font-size:12px;padding:1px 4px}</style>"
            f"<h2>srum: {len(cards)} recent samples</h2>" + "".join(cards)
        )
        self.path.write_text(page, encoding="utf-8")
        return self.path

    def _card(self, item: dict[str, Any]) -> str:
        rec: SampleRecord = item["record"]
        boxed = draw_boxes(item["image"], rec.regions, 1.0 / item["stride"])
        heat = heatmap(item["R"], item["image"]) if item["R"] is not None else None
        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{_fmt(r.score)}</td><td>{html.escape(r.label)}</td>"
            f"<td>{html.escape(r.reason[:REASON_CHARS])}</td></tr>"
            for i, r in enumerate(rec.regions)
        )
        head = (
            f"<b>{html.escape(rec.prompt.text)}</b><br>v{rec.policy_version} · "
            f"global {_fmt(rec.global_score)} · alpha {_fmt(rec.alpha)}"
            + (f" · <b>dropped</b> ({html.escape(str(rec.drop_reason))})" if rec.dropped else "")
        )
        imgs = f"<img src='{_data_url(boxed)}'>" + (f"<img src='{_data_url(heat)}'>" if heat is not None else "")
        return f"<div class='c'>{head}<br>{imgs}<table>{rows}</table></div>"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):+.2f}"


def draw_boxes(image: np.ndarray, regions: list[Region], box_scale: float = 1.0) -> Image.Image:
    """The image with each region's box (times ``box_scale``) and "id:score" drawn on it (green for
    positive, red for negative)."""
    img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    scale = max(1, 256 // max(img.size))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    for i, region in enumerate(regions):
        box = region.box
        if not all(math.isfinite(float(v)) for v in box):
            continue
        score = region.score
        color = (200, 200, 200) if score is None else ((0, 170, 0) if score >= 0 else (220, 0, 0))
        x1, y1, x2, y2 = (float(v) * scale * box_scale for v in box)
        if x2 <= x1 or y2 <= y1:
            continue
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], outline=color, width=2)
        draw.text((x1 + 2, y1 + 1), f"{i + 1}:{_fmt(score)}", fill=color)
    return img


def heatmap(reward_map: np.ndarray, image: np.ndarray) -> Image.Image:
    """The reward map as a colour heat-map blended over the image (blue = low weight, red = high)."""
    from matplotlib import colormaps

    R = np.asarray(reward_map, dtype=np.float32)
    lo, hi = (-1.0, 1.0) if R.min() < 0 else (0.0, 1.0)
    norm = np.clip((R - lo) / (hi - lo), 0.0, 1.0)
    rgb = (colormaps["coolwarm"](norm)[..., :3] * 255).astype(np.uint8)
    heat = Image.fromarray(rgb).resize((image.shape[1], image.shape[0]), Image.NEAREST)
    base = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    out = Image.blend(base, heat, 0.6)
    scale = max(1, 256 // max(out.size))
    return out.resize((out.width * scale, out.height * scale), Image.NEAREST) if scale > 1 else out


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
