"""Job entrypoint of the online SRUM loop.

Launch it locally (starts a Ray on 127.0.0.1 when none is given):

    python -m srum.main --config configs/default.yaml [dotted.key=value ...]

or on a running Ray cluster, which is what `ray job submit` runs:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m srum.main --config configs/default.yaml run.max_steps=500

It stops on its step or time budget, on `srum stop` / `ray job stop` / SIGTERM / Ctrl-C, always after
draining in-flight work and writing a final checkpoint. Exit status: 0 when it ended cleanly, 2 for a
bad config or prompt file, 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from core.config_io import ConfigError, load_config
from core.prompt_sets import PromptSourceError

log = logging.getLogger("srum")


def build_parser(prog: str = "python -m srum.main") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Run the online SRUM loop (sample -> judge -> train).")
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lambda_c=0.3 run.max_steps=20")
    p.add_argument("--summary-json", default=None, help="also write the final status to this JSON file")
    return p


def run(config: str | None, overrides: Sequence[str], summary_json: str | None = None) -> int:
    """Load the config, run the loop, print the summary. Returns the process exit status."""
    try:
        cfg = load_config(config, overrides)
        if not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
            # a local Ray: keep it on loopback (Ray reads this before import; it otherwise maps 127.0.0.1
            # to the machine's own address)
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        from cluster.driver import Driver  # imported here so `--help` and config errors stay fast
        from srum.registry import compose

        driver = Driver(cfg, compose(cfg))
    except (ConfigError, PromptSourceError) as exc:
        print(f"srum: {exc}", file=sys.stderr)
        return 2

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if driver.stop_reason is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        print(f"\nsrum: {name} received: finishing in-flight work and writing a final checkpoint", flush=True)
        driver.request_stop(name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from cluster.ray_cluster import ClusterTooSmall

    try:
        summary = driver.run()
    except ClusterTooSmall as exc:
        print(f"srum: {exc}", file=sys.stderr)
        return 2
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
    ok = summary.get("invariant_ok", True)
    if not ok:
        print("srum: accounting invariant failed: generated != trained + in buffer + dropped", file=sys.stderr)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None, prog: str = "python -m srum.main") -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser(prog).parse_intermixed_args(argv)
    return run(args.config, args.overrides, args.summary_json)


if __name__ == "__main__":
    sys.exit(main())
