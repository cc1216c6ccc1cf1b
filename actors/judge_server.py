"""Judge-server launcher: starts an OpenAI-compatible judge server (vLLM in production) as a subprocess on
the node this actor is placed on (a GPU node: give the actor `num_gpus=1`), waits for `/health`, restarts
it when it dies, and hands its URL to the scorers.

    launcher = ray.remote(JudgeServerLauncher).options(num_gpus=1).remote(
        JudgeServerLauncher.vllm_command("Qwen/Qwen2.5-VL-7B-Instruct", port=8000))
    url = ray.get(launcher.start.remote())          # e.g. http://10.0.0.5:8000/v1

Any command that serves the OpenAI API works (on this CPU machine the tests use vLLM's CPU packaging).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("srum.judge_server")


class JudgeServerError(RuntimeError):
    pass


class JudgeServerLauncher:
    def __init__(self, command: list[str], port: int = 0, host: str | None = None, bind: str | None = None,
                 env: dict[str, str | None] | None = None, ready_timeout_s: float = 600.0,
                 monitor_interval_s: float = 2.0, max_restarts: int = 5, log_path: str | None = None,
                 cwd: str | None = None):
        """`command` may hold ``{host}`` and ``{port}``, filled in at each start; `port=0` picks a free port on
        this node at the first start (kept across restarts). `host` is the address in the URL (default: this
        node's), `bind` the one the server listens on (``{host}``; default: `host`). `env` is added to this process's environment (a None value removes the variable);
        `max_restarts=0` turns the restart monitor off."""
        if not command:
            raise JudgeServerError("empty judge-server command")
        self.command = list(command)
        self.port = port
        self.host = host or _node_ip()
        self.bind = bind or self.host
        merged = {**os.environ, **(env or {})}
        self.env = {k: v for k, v in merged.items() if v is not None}
        self.cwd = cwd
        self.ready_timeout_s = ready_timeout_s
        self.monitor_interval_s = monitor_interval_s
        self.max_restarts = max_restarts
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._monitor: threading.Thread | None = None

    @staticmethod
    def vllm_command(model: str, port: int, served_name: str | None = None, host: str = "127.0.0.1",
                     extra: list[str] | None = None) -> list[str]:
        """`vllm serve` with the flags srum relies on (structured outputs with no free whitespace), bound to
        `host` (loopback unless told otherwise: give the node's address to serve other nodes)."""
        cmd = ["vllm", "serve", model, "--host", host, "--port", str(port),
               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
        if served_name:
            cmd += ["--served-model-name", served_name]
        return cmd + list(extra or [])

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> str:
        """Start the server (if not running), wait until `/health` answers, start the monitor. Returns the URL."""
        self._spawn()
        self._wait_ready()
        if self._monitor is None and self.max_restarts > 0:
            self._monitor = threading.Thread(target=self._watch, name="judge-server-monitor", daemon=True)
            self._monitor.start()
        return self.url()

    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def filled_command(self) -> list[str]:
        """The command with ``{host}`` and ``{port}`` filled in (only those tokens: JSON flags stay as written)."""
        return [c.replace("{host}", self.bind).replace("{port}", str(self.port)) for c in self.command]

    def health(self) -> bool:
        try:
            return httpx.get(f"http://{self.host}:{self.port}/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def info(self) -> dict[str, Any]:
        """URL, pid, restarts, ``alive`` (the process runs), ``ready`` (it answers /health) and ``started``
        (start() was called: False in an actor Ray just restarted)."""
        alive = self.proc is not None and self.proc.poll() is None
        return {"url": self.url(), "pid": self.proc.pid if self.proc else None, "restarts": self.restarts,
                "alive": alive, "ready": alive and self.health(), "started": self._monitor is not None or alive,
                "gave_up": self.restarts >= self.max_restarts and not alive}

    def stop(self, hard: bool = False) -> dict[str, Any]:
        """Stop the server (SIGTERM, SIGKILL after 15 s; `hard`: SIGKILL at once, as a crash would)."""
        self._stopping.set()
        self._kill(signal.SIGKILL if hard else signal.SIGTERM)
        return self.info()

    # ------------------------------------------------------------------ internals
    def _spawn(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        if self.port == 0:
            self.port = free_port(self.bind)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115 - lives with proc
        log.info("starting judge server: %s", " ".join(self.filled_command()))
        self.proc = subprocess.Popen(self.filled_command(), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=self.cwd, start_new_session=True,
                                     preexec_fn=_die_with_parent if self._long_lived_thread() else None)
        if self.log_path:
            out.close()  # the child holds its own copy

    def _long_lived_thread(self) -> bool:
        """The kernel's parent-death signal fires when the *thread* that spawned the child exits: only the main
        thread (Ray runs a launcher actor's calls there) and this launcher's monitor live as long as it does; a
        server started from any other thread (e.g. ``asyncio.to_thread``) is not tied to it."""
        return threading.current_thread() in (threading.main_thread(), self._monitor)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise JudgeServerError(f"judge server exited with code {self.proc.returncode} before it was ready "
                                       f"({' '.join(self.filled_command())}); see {self.log_path or 'its output'}")
            if self.health():
                log.info("judge server ready at %s", self.url())
                return
            time.sleep(0.5)
        self._kill()
        raise JudgeServerError(f"judge server at {self.url()} not healthy after {self.ready_timeout_s:.0f} s")

    def _watch(self) -> None:
        while not self._stopping.wait(self.monitor_interval_s):
            if self.proc is not None and self.proc.poll() is None:
                continue
            if self.restarts >= self.max_restarts:
                log.error("judge server died %d times; giving up", self.restarts)
                return
            self.restarts += 1
            log.warning("judge server died (code %s); restart %d/%d", self.proc.returncode if self.proc else None,
                        self.restarts, self.max_restarts)
            try:
                self._spawn()
                self._wait_ready()
            except JudgeServerError as exc:
                log.error("restart failed: %s", exc)

    def _kill(self, sig: int = signal.SIGTERM) -> None:
        """Signal the server's whole process group (a server may have engine workers beside it)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            pass
        try:  # what outlived the leader, or ignored SIGTERM
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def _die_with_parent() -> None:
    """In the child, before exec (Linux): SIGTERM when the spawning thread dies (the launcher's main thread or
    its monitor), so a launcher that Ray kills leaves no orphan server holding the GPU and the port."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host if host != "0.0.0.0" else "", 0))
        return int(sock.getsockname()[1])


def _node_ip() -> str:
    """This node's address as Ray knows it (so other nodes can reach the server), else loopback."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray, loopback is right
        pass
    return socket.gethostbyname("localhost")
