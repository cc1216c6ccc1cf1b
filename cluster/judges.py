"""The judge servers a run launches itself (``judge.launch``): one :class:`~actors.judge_server.JudgeServerLauncher`
actor per replica, driven by the driver without blocking its loop.

At start the driver waits until every replica answers ``/health`` (a replica that cannot start is an
error naming its log). While the loop runs, :meth:`JudgeReplicas.poll` asks each replica for its state
every ``PROBE_EVERY_S`` (one small call, never waited on): a server process that died is restarted by its
launcher (``judge.launch.max_restarts``); a launcher actor that died is restarted by Ray
(``cluster.max_restarts``) and started again here. The URLs of the replicas that answer ``/health`` are
what the scorers' judge clients balance over (:meth:`JudgeReplicas.urls`); ``srum scale --judges N`` adds
replicas (they join once healthy) or stops the newest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.judge_server import JudgeServerLauncher
from core.config import JudgeLaunchConfig

log = logging.getLogger("srum.judges")

PROBE_EVERY_S = 2.0  # how often each replica is asked whether its server is up
ANNOUNCE_EVERY_S = 10.0  # the scorers are told the URLs at least this often (one Ray restarted has older ones)
STRUCTURED_OUTPUTS = '{"backend": "xgrammar", "disable_any_whitespace": true}'  # what srum's schemas need


def server_command(launch: JudgeLaunchConfig, model: str, served_model_name: str) -> list[str]:
    """The replica's command: ``launch.command`` with {model} and {served_model_name} filled in (the launcher
    fills {host} and {port}), else ``vllm serve`` with srum's flags; ``launch.extra_args`` appended."""
    if launch.command:
        base = [c.replace("{model}", model).replace("{served_model_name}", served_model_name) for c in launch.command]
    else:
        base = ["vllm", "serve", model, "--host", "{host}", "--port", "{port}", "--served-model-name",
                served_model_name, "--structured-outputs-config", STRUCTURED_OUTPUTS]
    return base + list(launch.extra_args)


@dataclass
class Replica:
    replica_id: str
    handle: Any
    call: Any = None  # the pending start() or info() of this replica
    calling: str = ""
    next_probe: float = 0.0
    url: str | None = None
    ready: bool = False
    restarts: int = 0
    start_failures: int = 0
    stopping: bool = False


class JudgeReplicas:
    """The run's judge servers (see the module docstring). Plain class, owned by the driver."""

    def __init__(self, run_name: str, launch: JudgeLaunchConfig, served_model_name: str, log_dir: Path,
                 max_restarts: int):
        self.run_name, self.launch, self.log_dir, self.max_restarts = run_name, launch, log_dir, max_restarts
        self.command = server_command(launch, launch.model or served_model_name, served_model_name)
        self.replicas: dict[str, Replica] = {}
        self._next_index = 0
        self.failures = 0  # replica calls that failed (a launcher that died, a server that would not start)
        self._announced: tuple[Any, ...] = ()  # (urls, scorer epoch) last handed to the scorers
        self._next_announce = 0.0

    # ------------------------------------------------------------------ size
    def size(self) -> int:
        return sum(not r.stopping for r in self.replicas.values())

    def scale_to(self, n: int) -> None:
        """Start replicas up to ``n`` (they join :meth:`urls` once healthy) or stop the newest beyond it."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        while self.size() < n:
            rid = f"judge-{self._next_index}"
            self._next_index += 1
            launch = self.launch
            bind = launch.host
            handle = ray.remote(JudgeServerLauncher).options(
                name=f"srum-{self.run_name}-{rid}", num_cpus=launch.num_cpus, num_gpus=launch.num_gpus,
                resources=dict(launch.resources) or None, max_restarts=self.max_restarts,
            ).remote(self.command, host=None if bind == "0.0.0.0" else bind, bind=bind, env=launch.env,
                     ready_timeout_s=launch.ready_timeout_s, max_restarts=launch.max_restarts,
                     log_path=str(self.log_dir / f"{rid}.log"))
            replica = Replica(rid, handle)
            self._call(replica, "start")
            self.replicas[rid] = replica
            log.info("judge replica %s starting (log: %s)", rid, self.log_dir / f"{rid}.log")
        live = sorted((r for r in self.replicas.values() if not r.stopping),
                      key=lambda r: int(r.replica_id.rsplit("-", 1)[1]), reverse=True)
        for replica in live[: max(0, len(live) - n)]:
            replica.stopping, replica.ready = True, False
            self._call(replica, "stop")
            log.info("judge replica %s stopping", replica.replica_id)

    def start(self) -> list[str]:
        """The run's start: ``launch.replicas`` servers, waited for until healthy; returns their URLs."""
        print(f"srum: starting {self.launch.replicas} judge server(s) (logs: {self.log_dir})", flush=True)
        self.scale_to(self.launch.replicas)
        return self.wait_ready(self.launch.ready_timeout_s)

    def wait_ready(self, timeout_s: float) -> list[str]:
        """Block until every replica started (the run's start); raise naming the ones that did not."""
        deadline = time.monotonic() + timeout_s
        while any(r.calling == "start" for r in self.replicas.values()) and time.monotonic() < deadline:
            self.poll(wait_s=min(1.0, max(0.0, deadline - time.monotonic())))
        bad = [r.replica_id for r in self.replicas.values() if not r.ready and not r.stopping]
        if bad:
            logs = ", ".join(str(self.log_dir / f"{rid}.log") for rid in bad)
            raise RuntimeError(f"judge replica(s) {', '.join(bad)} did not become healthy within {timeout_s:.0f} s "
                               f"(command: {' '.join(self.command)}); see {logs}")
        return self.urls()

    # ------------------------------------------------------------------ the loop's part
    def urls(self) -> list[str]:
        """URLs of the replicas whose servers answer /health, in replica order."""
        return [r.url for r in self.replicas.values() if r.ready and not r.stopping and r.url]

    def urls_to_announce(self, scorer_epoch: int) -> list[str] | None:
        """Poll; the healthy URLs when the scorers should be told them (they, or the scorers, changed, or
        ``ANNOUNCE_EVERY_S`` passed), else None. With none healthy the scorers keep the last URLs: their
        failures are counted and the outage breaker pauses sampling."""
        self.poll()
        urls, now = self.urls(), time.monotonic()
        key = (tuple(urls), scorer_epoch)
        if not urls or (key == self._announced and now < self._next_announce):
            return None
        if self._announced and key[0] != self._announced[0]:
            log.info("judge endpoints now %s", urls)
        self._announced, self._next_announce = key, now + ANNOUNCE_EVERY_S
        return urls

    def poll(self, wait_s: float = 0.0) -> bool:
        """Handle finished replica calls and send the due probes; returns True when :meth:`urls` changed."""
        before = self.urls()
        pending = {r.call: r for r in self.replicas.values() if r.call is not None}
        if pending:
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)
            for ref in ready:
                self._on_result(pending[ref], ref)
        now = time.monotonic()
        for replica in self.replicas.values():
            if replica.call is None and not replica.stopping and now >= replica.next_probe:
                self._call(replica, "info")
        return self.urls() != before

    def _call(self, replica: Replica, method: str) -> None:
        replica.call, replica.calling = getattr(replica.handle, method).remote(), method
        replica.next_probe = time.monotonic() + PROBE_EVERY_S

    def _on_result(self, replica: Replica, ref: Any) -> None:
        method, replica.call, replica.calling = replica.calling, None, ""
        try:
            result = ray.get(ref)
        except ray.exceptions.ActorDiedError as exc:
            self.failures += 1
            if not replica.stopping:
                log.error("judge replica %s is dead and Ray will not restart it: %s", replica.replica_id,
                          str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            self.replicas.pop(replica.replica_id, None)
            return
        except ray.exceptions.RayError as exc:  # the launcher is restarting, or its server would not start
            self.failures += 1
            replica.ready = False
            replica.start_failures += method == "start"
            lines = [line for line in str(exc).splitlines() if line.strip()]
            log.warning("judge replica %s: %s failed (%s)", replica.replica_id, method,
                        lines[-1] if lines else type(exc).__name__)
            return
        if method == "stop":
            ray.kill(replica.handle, no_restart=True)
            self.replicas.pop(replica.replica_id, None)
        elif method == "start":
            replica.url, replica.ready = result, True
            log.info("judge replica %s ready at %s", replica.replica_id, result)
        else:
            self._on_info(replica, result)

    def _on_info(self, replica: Replica, info: dict[str, Any]) -> None:
        was_ready = replica.ready
        replica.url, replica.ready, replica.restarts = info["url"], bool(info["ready"]), int(info["restarts"])
        if not info["started"]:  # Ray restarted the launcher actor, or its start failed: start its server again
            if replica.start_failures > self.launch.max_restarts:
                replica.next_probe = float("inf")  # given up: left down, counted in failures
                log.error("judge replica %s failed to start %d times: left down (see %s)", replica.replica_id,
                          replica.start_failures, self.log_dir / f"{replica.replica_id}.log")
                return
            log.warning("judge replica %s has no server running: starting it", replica.replica_id)
            self._call(replica, "start")
        elif was_ready and not replica.ready:
            log.warning("judge replica %s is down (%s)", replica.replica_id,
                        "its server gave up restarting" if info["gave_up"] else "restarting its server")

    # ------------------------------------------------------------------ status and end
    def status(self) -> dict[str, Any]:
        return {"desired": self.size(), "ready": len(self.urls()), "server_restarts":
                sum(r.restarts for r in self.replicas.values()), "failures": self.failures, "urls": self.urls()}

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stop every server (SIGTERM to its process group), then the launcher actors."""
        refs = {r.handle.stop.remote(): r for r in self.replicas.values()}
        if refs:
            ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        for replica in self.replicas.values():
            ray.kill(replica.handle, no_restart=True)
        self.replicas.clear()
