"""Benchmark: this tree's online loop against another revision's, side by side in one run.

Runs ``bench/pipeline.py`` of each revision alternately (``--rounds`` times, order swapped every round),
each in its own process with ``PYTHONPATH`` set to that revision's root so its own code is imported,
then reads from their output, per scenario: online samples trained per second, the driver process's
CPU cores and its CPU time per learner batch (plus, for a revision whose replay buffer is its own
actor, the driver and buffer together, the work the driver now does itself).

    git worktree add /tmp/srum-before <commit>
    python bench/compare_revisions.py --before /tmp/srum-before [--before-args="--skip-sync"]

Ends with ``RESULT`` lines: the after/before ratio of online throughput (target >= 0.95: no loss) and
of driver CPU per batch (target <= 1.05), per scenario.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONLINE = re.compile(r"rep \d+ online:\s+([\d.]+) samples/s \(([\d.]+) in ([\d.]+) s")
CORES = re.compile(r"CPU cores: (.*?) \|")
SCENARIO = re.compile(r"^== (lat200|nolat):", re.M)


def parse(output: str, batch: int) -> dict[str, dict[str, float]]:
    """Per scenario: online rate, driver cores, driver (+ buffer actor) CPU seconds per learner batch."""
    out: dict[str, dict[str, float]] = {}
    starts = [(m.start(), m.group(1)) for m in SCENARIO.finditer(output)] + [(len(output), "")]
    for (a, name), (b, _) in zip(starts, starts[1:], strict=False):
        lines = output[a:b].splitlines()
        for i, line in enumerate(lines):
            m = ONLINE.search(line)
            if not m:
                continue
            rate, counted, seconds = (float(x) for x in m.groups())
            usage = next((CORES.search(x) for x in lines[i + 1:i + 3] if CORES.search(x)), None)
            roles = dict(re.findall(r"([A-Za-z ]+?) ([\d.]+)(?:, |$)", usage.group(1))) if usage else {}
            driver = float(roles.get("driver", "nan"))
            buffer = float(roles.get("ReplayBuffer", 0.0))
            batches = counted / batch
            out[name] = {"rate": rate, "driver_cores": driver, "driver_cpu_per_batch": driver * seconds / batches,
                         "driver_buffer_cpu_per_batch": (driver + buffer) * seconds / batches}
    return out


def run(root: Path, args: Sequence[str], log: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, str(root / "bench" / "pipeline.py"), *args]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=3600)
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return proc.stdout


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, type=Path, help="root of the other revision (a git worktree)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--args", default="--skip-stages --reps 1 --scenarios nolat,lat200",
                    help="pipeline.py arguments for both revisions")
    ap.add_argument("--before-args", default="--skip-sync", help="extra arguments for the other revision")
    ap.add_argument("--after-args", default="--set run.refresh_every=100000",
                    help="extra arguments for this tree (default: no curves/gallery refresh during the run, which "
                         "the other revision does not do either)")
    ap.add_argument("--batch", type=int, default=4, help="learner batch size the pipeline runs use")
    ap.add_argument("--logs", type=Path, default=Path("/tmp/srum-compare-revisions"))
    a = ap.parse_args(argv)
    a.logs.mkdir(parents=True, exist_ok=True)
    common = shlex.split(a.args)
    results: dict[str, list[dict[str, dict[str, float]]]] = {"before": [], "after": []}
    for r in range(a.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for which in order:
            root, extra = ((a.before.resolve(), shlex.split(a.before_args)) if which == "before"
                           else (ROOT, shlex.split(a.after_args)))
            print(f"round {r}: {which} ({root})", flush=True)
            res = parse(run(root, [*common, *extra], a.logs / f"{which}-{r}.log"), a.batch)
            for name, v in sorted(res.items()):
                print(f"   {name}: online {v['rate']:.2f} samples/s; driver {v['driver_cores']:.2f} cores, "
                      f"{1e3 * v['driver_cpu_per_batch']:.1f} ms CPU per batch "
                      f"(driver + buffer actor {1e3 * v['driver_buffer_cpu_per_batch']:.1f} ms)", flush=True)
            results[which].append(res)
    for name in ("nolat", "lat200"):
        def med(which: str, key: str, name: str = name) -> float:
            return statistics.median(r[name][key] for r in results[which] if name in r)

        if not all(any(name in r for r in results[w]) for w in results):
            continue
        speed = med("after", "rate") / med("before", "rate")
        cpu = med("after", "driver_cpu_per_batch") / med("before", "driver_buffer_cpu_per_batch")
        print(f"{name}: online {med('before', 'rate'):.2f} -> {med('after', 'rate'):.2f} samples/s; driver CPU per "
              f"batch {1e3 * med('before', 'driver_cpu_per_batch'):.1f} ms (+ buffer actor "
              f"{1e3 * med('before', 'driver_buffer_cpu_per_batch'):.1f} ms) -> "
              f"{1e3 * med('after', 'driver_cpu_per_batch'):.1f} ms (medians of {a.rounds})")
        print(f"RESULT online_throughput_ratio_{name} {speed:.3f} target=0.95 ok={str(speed >= 0.95).lower()}")
        print(f"RESULT driver_cpu_per_batch_ratio_{name} {cpu:.3f} target=1.05 ok={str(cpu <= 1.05).lower()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
