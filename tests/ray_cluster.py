"""A real local Ray head on loopback for end-to-end tests (started once per test session).

`ray start --head` bound to 127.0.0.1 with fixed free ports (GCS, dashboard, metrics export), usage
stats off; `ray stop` at the end. Jobs are submitted through the dashboard's job API, exactly as
`ray job submit` does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    metrics_port: int
    bin_dir: Path
    proc: subprocess.Popen

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the `srum` command line against this cluster."""
        return subprocess.run([str(self.bin_dir / "srum"), *args, "--address", self.gcs_address],
                              capture_output=True, text=True, timeout=timeout, cwd=REPO)

    def metrics_text(self) -> str:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text


def start_ray_head() -> RayHead:
    bin_dir = Path(sys.executable).parent
    ray_bin = bin_dir / "ray"
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "ray")
    port, dash, metrics = free_port(), free_port(), free_port()
    # Ray 2.60 turns token authentication on for new clusters (token in ~/.ray/auth_token); clients in this
    # process and the `srum` / `ray` commands it runs must say they use it
    os.environ["RAY_AUTH_MODE"] = "token"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_JOB_STOP_WAIT_TIME_S": "30",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           # as with an activated venv: the job's `python` is this interpreter
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--metrics-export-port={metrics}",
           "--disable-usage-stats", "--num-cpus=4", "--include-dashboard=true", "--block",
           # ports with fixed defaults get free ones, so another Ray on this machine cannot block this one
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    # --block keeps `ray start` in the foreground: stopping its process group stops exactly this cluster
    # (unlike `ray stop`, which would stop every Ray on the machine)
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"srum-ray-head-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", metrics, bin_dir, proc)
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:  # the job API answers a little after `ray start` returns
        try:
            JobSubmissionClient(head.dashboard_url).list_jobs()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_ray_head(head)
                pytest.fail(f"Ray head did not come up within 90 s (see {log.name})")
            time.sleep(1)
    return head


def stop_ray_head(head: RayHead) -> None:
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        if head.proc.poll() is not None:
            return
        try:
            os.killpg(head.proc.pid, sig)
            head.proc.wait(timeout=wait)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


@contextlib.contextmanager
def local_ray(namespace: str, pickle_by_value: str | None = None) -> Iterator:
    """An in-process local Ray (2 CPUs, no dashboard) on loopback for one test module; yields `ray`.

    `pickle_by_value`: a test module whose classes workers get by value (they need not import tests/)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind every Ray port to 127.0.0.1
    import ray
    import ray.cloudpickle

    if pickle_by_value:
        ray.cloudpickle.register_pickle_by_value(sys.modules[pickle_by_value])
    started = not ray.is_initialized()
    if started:
        ray._private.ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the env var
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=namespace, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def wait_until_lost(ray, ref, timeout_s: float = 60.0) -> None:
    """Wait until a borrowed object is known lost after its owner was killed (on a ref nobody else reads).

    Owner death reaches borrowers asynchronously: until it does, a get is just not ready
    (``GetTimeoutError``), which on a loaded machine can last several seconds, so poll until
    ``ObjectLostError`` (``OwnerDiedError`` is a subclass) rather than fail on the first timeout.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(ref, timeout=1)
        except ray.exceptions.ObjectLostError:
            return
        except ray.exceptions.GetTimeoutError:
            continue
        time.sleep(0.1)
    raise AssertionError(f"the object outlived its owner for {timeout_s:.0f} s")


def wait_until_dead(ray, handle, timeout_s: float = 30.0) -> None:
    """Wait until a killed actor no longer answers: ``ray.kill`` is asynchronous, and a call made just after
    it may still be served (the caller would then see the actor alive)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=10)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError(f"the actor still answers {timeout_s:.0f} s after it was killed")
