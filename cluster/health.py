"""What the driver watches to stay up: where a run's outputs live, and a judge outage (pause sampling
rather than generate samples that will all be dropped).

Plain logic, no Ray: :func:`storage_dir` resolves ``run.output_dir`` once, in the driver, before any actor
starts; :class:`OutageBreaker` is a circuit breaker over the recent scored samples.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("srum.health")

STORAGE_ENV = "SRUM_STORAGE"  # where relative run.output_dir resolve for a job run from Ray's package copy
JOB_STORAGE_DEFAULT = Path("~/srum-runs")
WINDOW = 32  # scored samples the outage breaker looks at
MIN_SAMPLES = 8  # ... at least this many before it may open
MAX_PAUSE_S = 60.0


def storage_dir(output_dir: str, cwd: Path | None = None) -> Path:
    """``run.output_dir`` as an absolute path, resolved once by the driver so every actor writes the same
    place: absolute as given; relative to ``$SRUM_STORAGE`` when set; under ``ray job submit`` (the driver
    runs in Ray's temporary package copy of the working dir, gone with the session) relative to
    ``~/srum-runs``, with a warning; else relative to the launch directory."""
    path = Path(output_dir).expanduser()
    if path.is_absolute():
        return path
    if os.environ.get(STORAGE_ENV):
        return (Path(os.environ[STORAGE_ENV]).expanduser() / path).resolve()
    cwd = cwd or Path.cwd()
    if "runtime_resources" in cwd.parts or any(p.startswith("_ray_pkg_") for p in cwd.parts):
        root = (JOB_STORAGE_DEFAULT.expanduser() / path).resolve()
        log.warning("run.output_dir=%r is relative and this job runs in Ray's temporary copy of its working dir "
                    "(%s): outputs go to %s instead. On a multi-node cluster give an absolute path on shared "
                    "storage (or set $%s).", output_dir, cwd, root, STORAGE_ENV)
        return root
    return (cwd / path).resolve()


def logged_train_steps(metrics_path: Path) -> int:
    """How many learner steps an earlier run logged in ``metrics.jsonl`` (0 when there is none)."""
    if not metrics_path.is_file():
        return 0
    steps = 0
    for line in metrics_path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            steps += json.loads(line).get("kind") == "train"
        except (json.JSONDecodeError, AttributeError):
            continue
    return steps


class OutageBreaker:
    """Pause sampling while the judge is down.

    It opens when at least ``failure_rate`` of the last :data:`WINDOW` scored samples (once
    :data:`MIN_SAMPLES` are in) failed in the judge: sampling pauses for ``pause_s``, doubling while the
    outage lasts (at most :data:`MAX_PAUSE_S`). After a pause it lets one probe batch through
    (``half_open``); the probe's samples close it, or open it again.
    """

    def __init__(self, failure_rate: float, pause_s: float):
        self.failure_rate, self.base_pause_s = failure_rate, pause_s
        self.recent: deque[bool] = deque(maxlen=WINDOW)
        self.pause_s = pause_s
        self.paused_until = 0.0
        self.half_open = False
        self.pauses = 0
        self.paused_seconds = 0.0

    def observe(self, judge_failed: Iterable[bool], now: float | None = None) -> None:
        """Record one scored batch (one flag per sample)."""
        now = time.monotonic() if now is None else now
        flags = list(judge_failed)
        if self.half_open:  # the probe batch decides
            self.half_open = False
            if flags and sum(flags) / len(flags) >= self.failure_rate:
                self._open(now, longer=True)
            else:
                self.pause_s = self.base_pause_s
                log.info("judge answers again: sampling resumes")
            return
        self.recent.extend(flags)
        if len(self.recent) >= MIN_SAMPLES and sum(self.recent) / len(self.recent) >= self.failure_rate:
            self._open(now, longer=False)

    def _open(self, now: float, longer: bool) -> None:
        self.pause_s = min(MAX_PAUSE_S, self.pause_s * 2) if longer else self.base_pause_s
        self.paused_until = now + self.pause_s
        self.pauses += 1
        self.paused_seconds += self.pause_s
        self.recent.clear()
        log.warning("judge outage: %.0f%% of the recent samples failed in the judge; sampling pauses %.0f s "
                    "(pause %d)", 100 * self.failure_rate, self.pause_s, self.pauses)

    def paused(self, now: float | None = None) -> bool:
        return (time.monotonic() if now is None else now) < self.paused_until

    def allowed_in_flight(self, cap: int, now: float | None = None) -> int:
        """How many sample batches may be in flight now: none while paused, one probe after a pause."""
        now = time.monotonic() if now is None else now
        if self.paused_until:
            if now < self.paused_until:
                return 0
            self.paused_until, self.half_open = 0.0, True
        return 1 if self.half_open else cap
