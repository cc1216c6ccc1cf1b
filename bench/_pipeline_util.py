"""Helpers for ``bench/pipeline.py``: the loopback judge server, steady-state rate maths, CPU accounting.

* :class:`JudgeServerProcess` runs the tests' fake OpenAI-compatible server
  (``tests/judge_fake_server.py``, reused unchanged) in a *subprocess* on 127.0.0.1 with a fixed
  per-request latency, so its event loop never competes with the measured loop for the GIL. The
  subprocess answers global, sample-level and region prompts, in text or structured (JSON) mode, and
  exits when its stdin closes or after ``max_lifetime_s``.
* :func:`steady_rate` / :func:`read_train_points` / :func:`generation_window`: samples per second
  between a warm-up point and the end of a run, from ``(time, cumulative count)`` points (e.g. the
  driver's ``metrics.jsonl``).
* :class:`CpuMonitor`: CPU seconds of this process tree grouped by role (Ray actor class, Ray's own
  processes, the judge server) and of the whole machine, to say where the cores went in a window.

This module imports neither torch nor Ray (the server subprocess starts fast).

Run ``python bench/_pipeline_util.py serve --latency 0.2`` to start the server by hand (prints
``PORT <n>``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

def _serve(latency_s: float, max_lifetime_s: float) -> None:
    """Subprocess body: start the fake server, print its port, wait for stdin EOF (or the lifetime)."""
    import threading

    from tests.judge_fake_server import FakeOpenAIServer, scorer_answer

    server = FakeOpenAIServer(latency_s=latency_s, answer=scorer_answer).start()
    print(f"PORT {server.port}", flush=True)
    done = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait(timeout=max_lifetime_s)
    print(f"SERVED {len(server.requests)} max_in_flight {server.max_in_flight}", flush=True)
    server.close()


class JudgeServerProcess:
    """The fake judge server in a child process on 127.0.0.1 with ``latency_s`` per chat request.

    Use as a context manager; ``base_url`` is the ``/v1`` URL for ``judge.endpoints``.
    """

    def __init__(self, latency_s: float, max_lifetime_s: float = 1200.0, stderr_path: str | Path | None = None):
        self.latency_s = latency_s
        self.max_lifetime_s = max_lifetime_s
        self.stderr_path = stderr_path
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self.final_line = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> JudgeServerProcess:
        # the server logs a traceback for every request cut off by a killed actor: keep that out of the report
        err = open(self.stderr_path, "a", encoding="utf-8") if self.stderr_path else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "serve", "--latency", str(self.latency_s),
             "--max-lifetime", str(self.max_lifetime_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True, cwd=str(ROOT))
        if err is not None:
            err.close()  # the child holds its own descriptor
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.startswith("PORT "):
            self.proc.kill()
            raise RuntimeError(f"fake judge server did not start (first line {line!r})")
        self.port = int(line.split()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            out, _ = self.proc.communicate(input="", timeout=15)
            self.final_line = out.strip()
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


# ------------------------------------------------------------------------------- rate arithmetic
def steady_rate(points: Sequence[tuple[float, float]], warmup: int) -> tuple[float, float, float]:
    """Rate between ``points[warmup]`` and ``points[-1]`` of cumulative-count points ``(time, count)``.

    Returns ``(rate, counted, seconds)``: ``rate = (count_end - count_warm) / (t_end - t_warm)``.
    Raises ``ValueError`` when fewer than two points remain after the warm-up.
    """
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if len(points) < warmup + 2:
        raise ValueError(f"need at least {warmup + 2} points for a rate after {warmup} warm-up points, "
                         f"got {len(points)}")
    (t0, c0), (t1, c1) = points[warmup], points[-1]
    if t1 <= t0:
        raise ValueError(f"non-increasing times {t0} -> {t1}")
    return (c1 - c0) / (t1 - t0), c1 - c0, t1 - t0


def generation_window(points: Sequence[tuple[float, float]], warmup: int, cap: int) -> list[tuple[float, float]]:
    """Trim ``points`` (one per finished call) so the window after ``warmup`` spans whole generations.

    A stage kept at ``cap`` calls in flight, with a new call submitted as each one finishes, completes
    calls in bursts (e.g. ``cap`` judge batches that all wait the same 200 ms). Call ``i + cap`` is
    submitted when call ``i`` finishes, so the window from finish ``warmup`` to finish
    ``warmup + m * cap`` holds exactly ``m`` generations; other end points over- or under-count a burst.
    """
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    m = (len(points) - 1 - warmup) // cap
    if m < 1:
        raise ValueError(f"need at least {warmup + cap + 1} points for one generation of {cap} after "
                         f"{warmup} warm-up points, got {len(points)}")
    return list(points[: warmup + m * cap + 1])


def read_train_points(metrics_path: str | Path) -> list[tuple[float, float]]:
    """``(time, cumulative samples trained)`` after each learner step in a driver ``metrics.jsonl``."""
    points: list[tuple[float, float]] = []
    total = 0.0
    with open(metrics_path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("kind") == "train" and not rec.get("skipped"):
                total += float(rec.get("samples", 0.0))
                points.append((float(rec["time"]), total))
    return points


def median(values: Sequence[float]) -> float:
    """Median (mean of the middle two for an even count); raises on an empty sequence."""
    if not values:
        raise ValueError("median of nothing")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


# ----------------------------------------------------------------------------------- CPU accounting
def role_of(pid: int, cmdline: Sequence[str], self_pid: int) -> str:
    """Group name of a process in this benchmark's tree: the bench process itself ("driver"), a Ray actor
    by class ("SamplerActor", ...), an idle Ray worker, the fake judge server, or Ray's own daemons."""
    if pid == self_pid:
        return "driver"
    first = cmdline[0] if cmdline else ""
    if first.startswith("ray::"):
        name = first[5:].split(".")[0].split()[0] if first[5:] else "worker"
        return "ray idle worker" if name == "IDLE" else name
    if any("_pipeline_util.py" in part for part in cmdline):
        return "judge server"
    return "ray system"


class CpuMonitor:
    """Samples, every ``interval_s`` on a daemon thread, the cumulative CPU seconds of this process and
    all its descendants (grouped with :func:`role_of`) and the machine's busy CPU seconds."""

    def __init__(self, interval_s: float = 0.5):
        import psutil

        self._psutil = psutil
        self.interval_s = interval_s
        self.snapshots: list[tuple[float, dict[int, tuple[str, float]], float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[int, Any] = {}

    def _snapshot(self) -> None:
        ps = self._psutil
        me = ps.Process(os.getpid())
        per: dict[int, tuple[str, float]] = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                cached = self._procs.get(proc.pid)
                if cached is None or cached.create_time() != proc.create_time():
                    cached = self._procs[proc.pid] = proc
                # re-read each time: a Ray worker is retitled "ray::<Actor class>" once it hosts an actor
                role = role_of(proc.pid, cached.cmdline(), me.pid)
                t = cached.cpu_times()
                per[proc.pid] = (role, t.user + t.system)
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
        m = ps.cpu_times()
        busy = m.user + m.system + getattr(m, "nice", 0.0) + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)
        self.snapshots.append((time.time(), per, busy))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._snapshot()

    def __enter__(self) -> CpuMonitor:
        self._snapshot()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._snapshot()

    def usage(self, t0: float, t1: float) -> dict[str, float]:
        """Cores used per role between the snapshots nearest to wall times ``t0`` and ``t1``, plus "ours"
        (their sum), "machine" and "others" (machine - ours). A process that starts inside the window
        counts from 0; one that exits counts up to its last snapshot (actors come and go in a window)."""
        if len(self.snapshots) < 2:
            return {}
        ia = min(range(len(self.snapshots)), key=lambda i: abs(self.snapshots[i][0] - t0))
        ib = min(range(len(self.snapshots)), key=lambda i: abs(self.snapshots[i][0] - t1))
        dt = self.snapshots[ib][0] - self.snapshots[ia][0]
        if dt <= 0:
            return {}
        first: dict[int, float] = {}
        last: dict[int, tuple[str, float]] = {}
        for k in range(ia, ib + 1):
            for pid, (role, cpu) in self.snapshots[k][1].items():
                first.setdefault(pid, cpu if k == ia else 0.0)
                last[pid] = (role, cpu)
        out: dict[str, float] = {}
        for pid, (role, cpu) in last.items():
            out[role] = out.get(role, 0.0) + max(0.0, cpu - first[pid]) / dt
        ours = sum(out.values())
        machine = (self.snapshots[ib][2] - self.snapshots[ia][2]) / dt
        out.update(ours=ours, machine=machine, others=max(0.0, machine - ours), window_s=dt)
        return out


def format_usage(u: dict[str, float]) -> str:
    """``role 0.42, ...`` sorted by cores used, then ours / machine / others."""
    if not u:
        return "n/a"
    special = ("ours", "machine", "others", "window_s")
    roles = sorted(((k, v) for k, v in u.items() if k not in special), key=lambda kv: -kv[1])
    parts = [f"{k} {v:.2f}" for k, v in roles if v >= 0.005]
    return (", ".join(parts) + f" | ours {u['ours']:.2f}, machine {u['machine']:.2f}, "
            f"others {u['others']:.2f} cores (window {u['window_s']:.1f} s)")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="bench/pipeline.py helpers")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the fake judge server on 127.0.0.1 until stdin closes")
    s.add_argument("--latency", type=float, default=0.2, help="seconds slept per chat request")
    s.add_argument("--max-lifetime", type=float, default=1200.0, help="exit after this many seconds anyway")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        _serve(args.latency, args.max_lifetime)


if __name__ == "__main__":
    main()
