"""`srum`: the command line.

    srum run --config configs/default.yaml [key=value ...]   # the online loop, locally (same as srum.main)
    srum scale --samplers 4 --scorers 2 [--judges 2]          # change actor counts of the running job
    srum status [--json]                                      # throughput, buffer, versions, lag, judge health
    srum stop                                                 # ask the running job to finish (final checkpoint)
    srum config [--config X.yaml] [key=value ...] [--list [--all]]  # the resolved config / its fields
    srum eval [--config X.yaml] --model base --model ema:runs/R/checkpoints [--prompts F] [--k 4]  # benchmark
    srum export runs/R/checkpoints [--weights ema]            # a diffusers LoRA file or model directory

`scale`, `status` and `stop` talk to the running job's controller actor (`srum_controller`, namespace
`srum`) through Ray: run them on a node of the cluster (`--address auto`, the default) or pass the
cluster's address.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from core.config_io import ConfigError, config_to_yaml, describe_config, format_config_help, load_config


def _controller(address: str):
    if address.startswith(("127.", "localhost")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a loopback-bound cluster
    import ray

    from cluster.control import find_controller

    ray.init(address=address, namespace="srum", logging_level="ERROR", log_to_driver=False)
    return ray, find_controller()


def cmd_scale(args: argparse.Namespace) -> int:
    if args.samplers is None and args.scorers is None and args.judges is None:
        print("srum scale: give --samplers N, --scorers M and/or --judges J", file=sys.stderr)
        return 2
    ray, ctl = _controller(args.address)
    try:
        want = ray.get(ctl.scale.remote(samplers=args.samplers, scorers=args.scorers, judges=args.judges))
    except ray.exceptions.RayTaskError as exc:
        print(f"srum scale: {exc.cause if hasattr(exc, 'cause') else exc}", file=sys.stderr)
        return 2
    judges = f" judges={want['judges']}" if "judges" in want else ""
    print(f"srum: desired samplers={want['samplers']} scorers={want['scorers']}{judges} (applied within ~1 s; "
          "removed actors finish their in-flight work first; a new judge replica joins once its server is healthy)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cluster.progress import format_progress

    ray, ctl = _controller(args.address)
    status = ray.get(ctl.get_status.remote())
    if not status:
        print("srum: the job is starting; no status yet")
        return 0
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(format_progress(status))
    buf = status.get("buffer", {})
    print(f"buffer: {buf.get('in_buffer')} in / {buf.get('trained')} trained / dropped {buf.get('dropped')}")
    print(f"version lag per sampler: {status.get('lags')}")
    if "round" in status:  # cluster.mode=rounds
        r = status["round"]
        print(f"round {r['round']}: {r['phase']} (policy version {r['version']}; {r['submitted']}/{r['target']} "
              f"generated, pool {r['pool']}, {r['epochs']} epochs)")
    if "judges" in status:  # judge.launch: the run's own judge servers
        j = status["judges"]
        print(f"judge replicas: {j['ready']}/{j['desired']} ready, {j['server_restarts']} server restarts, "
              f"{j['failures']} failures; {', '.join(j['urls']) or 'no URL yet'}")
    for actor, counters in (status.get("judge") or {}).items():
        print(f"judge[{actor}]: {counters}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    ray, ctl = _controller(args.address)
    ray.get(ctl.request_stop.remote())
    print("srum: stop requested; the job drains in-flight work and writes a final checkpoint")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"srum: {exc}", file=sys.stderr)
        return 2
    if args.list:  # the fields of the sections this config selects (every backend's with --all)
        print(format_config_help(describe_config(None if args.all else cfg, all_variants=args.all)))
        return 0
    print(config_to_yaml(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from srum.main import build_parser as run_parser

    p = argparse.ArgumentParser(prog="srum", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the online loop", parents=[run_parser()], add_help=False)
    run.set_defaults(func=None)
    from srum.evaluate import build_parser as eval_parser
    from srum.export import build_parser as export_parser

    for name, parent, text in (("eval", eval_parser, "evaluate base / checkpoint / EMA weights on a prompt set"),
                               ("export", export_parser, "export a checkpoint as diffusers weights")):
        sub.add_parser(name, help=text, parents=[parent()], add_help=False).set_defaults(func=None)
    for name, func, text in (("scale", cmd_scale, "change actor counts of the running job"),
                             ("status", cmd_status, "show the running job's status"),
                             ("stop", cmd_stop, "ask the running job to finish cleanly")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--address", default="auto", help="Ray cluster address (default: auto = this node's)")
        s.set_defaults(func=func)
    sub.choices["scale"].add_argument("--samplers", type=int, default=None, help="desired sampler actors")
    sub.choices["scale"].add_argument("--scorers", type=int, default=None, help="desired scorer actors")
    sub.choices["scale"].add_argument("--judges", type=int, default=None,
                                      help="desired judge server replicas (runs with judge.launch only)")
    sub.choices["status"].add_argument("--json", action="store_true", help="print the whole status as JSON")
    c = sub.add_parser("config", help="show the resolved config, or --list every field")
    c.add_argument("--config", "-c", default=None)
    c.add_argument("overrides", nargs="*")
    c.add_argument("--list", action="store_true", help="the config's fields with their defaults and descriptions")
    c.add_argument("--all", action="store_true", help="with --list: every backend's fields, not only the selected")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # options and overrides may interleave: the entrypoint's own parser handles it
        from srum.main import main as run_main

        return run_main(argv[1:], prog="srum run")
    if argv[:1] == ["eval"]:
        from srum.evaluate import main as eval_main

        return eval_main(argv[1:], prog="srum eval")
    if argv[:1] == ["export"]:
        from srum.export import main as export_main

        return export_main(argv[1:], prog="srum export")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
