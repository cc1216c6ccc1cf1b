"""Joining or starting Ray for a run, and checking that the actors a config asks for fit the cluster."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ray

from cluster.control import NAMESPACE
from core.config import SRUMConfig

log = logging.getLogger("srum.driver")


class ClusterTooSmall(RuntimeError):
    """The actors a config asks for do not fit the local Ray it runs on."""


def connect_ray(cfg: SRUMConfig) -> None:
    """Join the cluster a job was submitted to (RAY_ADDRESS) or `cluster.address`, else start a local Ray on
    loopback with its dashboard on 127.0.0.1."""
    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0")}}
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, runtime_env=env, log_to_driver=True)
        return
    kwargs: dict[str, Any] = {}
    if cfg.cluster.metrics_port is not None:
        kwargs["_metrics_export_port"] = cfg.cluster.metrics_port
    # address="local": always a new local Ray (a bare ray.init() would join whatever `ray start` left behind)
    ray.init(address="local", namespace=NAMESPACE, runtime_env=env, include_dashboard=True, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", configure_logging=False, **kwargs)


def check_resources(cfg: SRUMConfig) -> None:
    """Actors that ask for more than the cluster has would wait forever: say so before creating them (an
    error on a local Ray, which cannot grow; a warning on a cluster, which an autoscaler may grow)."""
    c = cfg.cluster
    want = {"CPU": c.learner_resources.num_cpus + c.num_samplers * c.sampler_resources.num_cpus
            + c.num_scorers * c.scorer_resources.num_cpus,
            "GPU": c.learner_resources.num_gpus + c.num_samplers * c.sampler_resources.num_gpus
            + c.num_scorers * c.scorer_resources.num_gpus}
    launch = getattr(cfg.judge, "launch", None)
    if launch is not None:  # the judge servers the run starts
        want["CPU"] += launch.replicas * launch.num_cpus
        want["GPU"] += launch.replicas * launch.num_gpus
        for name, amount in launch.resources.items():  # e.g. {"judge": 1}: advertised by the judge nodes only
            want[name] = want.get(name, 0.0) + launch.replicas * amount
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in want.items() if v > have.get(k, 0.0) + 1e-9}
    if not short:
        return
    msg = ("the actors (and launched judges) ask for " + ", ".join(f"{v:g} {k} (the cluster has {h:g})" for k, (v, h) in short.items())
           + ": lower cluster.*_resources, judge.launch or the actor counts")
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        log.warning("%s; they wait until the cluster grows", msg)
    else:
        raise ClusterTooSmall(msg)


def call_while_restarting(handle: Any, method: str, timeout_s: float, poll_s: float = 2.0) -> Any:
    """``ray.get(handle.<method>.remote())``, waiting up to ``timeout_s`` while Ray restarts the actor."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(getattr(handle, method).remote())
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(poll_s)

