"""Judge replicas launched by the run (``judge.launch``): the command, the launcher's port and restart, and the
real driver with two replicas of the fake OpenAI server, one killed mid-run (the loop goes on, the replica
comes back) and a third added by a scale request (the scorers' endpoint list follows). The same with vLLM's
CPU packaging is in ``tests/test_judge_vllm.py``."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import httpx
import pytest

from actors.judge_server import JudgeServerLauncher
from cluster.judges import server_command
from core.config import JudgeLaunchConfig
from core.config_io import ConfigError, load_config
from tests.ray_cluster import local_ray

pytestmark = pytest.mark.timeout(600)
FAKE = [sys.executable, "-m", "tests.judge_fake_server", "--port", "{port}"]


def _wait(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_server_command_fills_the_model_and_keeps_json_flags():
    default = server_command(JudgeLaunchConfig(), "Qwen/Qwen2.5-VL-7B-Instruct", "qwen")
    assert default[:3] == ["vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct"]
    assert default[default.index("--served-model-name") + 1] == "qwen" and "{port}" in default
    assert '"disable_any_whitespace": true' in default[default.index("--structured-outputs-config") + 1]
    custom = server_command(JudgeLaunchConfig(command=["serve", "--model", "{model}", "--name", "{served_model_name}"],
                                              extra_args=["--dtype", "float32"]), "/m", "tiny")
    assert custom == ["serve", "--model", "/m", "--name", "tiny", "--dtype", "float32"]


def test_launch_and_endpoints_are_exclusive_and_launch_needs_the_openai_backend():
    with pytest.raises(ConfigError, match="both set"):
        load_config(None, ["judge.backend=openai", "judge.endpoints=[http://127.0.0.1:9/v1]", "judge.launch={}"])
    with pytest.raises(ConfigError):
        load_config(None, ["judge.launch={replicas: 2}"])  # the default shapes judge has no servers


def test_launch_resources_validate_and_reach_the_launcher_actors(tmp_path, monkeypatch):
    import types

    import cluster.judges as judges

    with pytest.raises(ConfigError, match=r"judge\.launch\.resources: custom resource amounts must be >= 0"):
        load_config(None, ["judge.backend=openai", "judge.launch.resources={judge: -1}"])
    with pytest.raises(ConfigError, match=r"judge\.launch\.resources: GPU: set by num_cpus / num_gpus"):
        load_config(None, ["judge.backend=openai", "judge.launch.resources={GPU: 1}"])
    seen: list[dict] = []

    class FakeRemote:  # ray.remote(cls).options(**kw).remote(...) without a Ray cluster
        def options(self, **kw):
            seen.append(kw)
            return self

        def remote(self, *args, **kwargs):
            return types.SimpleNamespace(start=types.SimpleNamespace(remote=lambda: object()))

    monkeypatch.setattr(judges, "ray", types.SimpleNamespace(remote=lambda cls: FakeRemote()))
    for resources, want in (({"judge": 1}, {"judge": 1.0}), ({}, None)):
        launch = JudgeLaunchConfig(resources=resources, num_gpus=1)
        judges.JudgeReplicas("r", launch, "m", tmp_path / "judges", max_restarts=0).scale_to(1)
        assert seen.pop()["resources"] == want


def test_launcher_picks_a_port_and_restarts_a_killed_server(tmp_path):
    launcher = JudgeServerLauncher(FAKE, host="127.0.0.1", ready_timeout_s=60, monitor_interval_s=0.2,
                                   log_path=str(tmp_path / "judge.log"), cwd=os.getcwd())
    try:
        url = launcher.start()
        port = launcher.port
        assert port > 0 and url == f"http://127.0.0.1:{port}/v1"
        assert httpx.get(url + "/models").json()["data"][0]["id"] == "tiny-vlm"
        info = launcher.info()
        assert info["ready"] and info["started"] and info["restarts"] == 0
        os.kill(info["pid"], signal.SIGKILL)  # a crash
        _wait(lambda: launcher.info()["restarts"] == 1 and launcher.info()["ready"], 60, "the restart")
        assert launcher.port == port and launcher.info()["pid"] != info["pid"]  # same URL, new process
    finally:
        launcher.stop()
    assert not launcher.info()["alive"]


def test_driver_launches_judges_survives_a_killed_one_and_scales_them(tmp_path):
    from cluster.driver import Driver
    from srum.registry import compose

    hold = tmp_path / "hold"  # while it exists, a restarted server waits: the test sees the replica down
    with local_ray("srum", __name__) as ray:
        cfg = load_config("configs/tiny_sd3.yaml", [
            f"run.output_dir={tmp_path}", "run.name=judges", "run.max_steps=400", "regions.proposer=none",
            "judge.backend=openai", "judge.mode=text", "judge.max_retries=2", "judge.backoff_s=0.05",
            "judge.timeout_s=5", "judge.max_tokens=16", "policy.num_inference_steps=2",
            "judge.launch={replicas: 2, num_gpus: 0, num_cpus: 0, ready_timeout_s: 60}",
            f"judge.launch.command=[{sys.executable}, -m, tests.judge_fake_server, --port, '{{port}}', "
            f"--hold-while, '{hold}']",
            "cluster.sampler_resources.num_cpus=0", "cluster.scorer_resources.num_cpus=0",
            "cluster.learner_resources.num_cpus=0", "learner.checkpoint_every=0"])
        driver = Driver(cfg, compose(cfg))
        log: dict = {}

        def scorer_urls() -> list[str]:
            member = driver.scorers.active[0]
            return sorted(ray.get(member.handle.get_metrics.remote())["judge"]["endpoints"])

        def inject() -> None:
            try:
                _wait(lambda: driver.step >= 3, 240, "training with two judges")
                log["urls"] = driver.judges.urls()
                replica = driver.judges.replicas["judge-0"]
                info = ray.get(replica.handle.info.remote())
                hold.touch()
                os.kill(info["pid"], signal.SIGKILL)  # one judge server crashes mid-run
                log["killed_at"] = driver.step
                _wait(lambda: len(driver.judges.urls()) == 1, 30, "the dead replica leaving the list")
                log["scorer_urls_while_down"] = scorer_urls_after(1)
                hold.unlink()
                _wait(lambda: len(driver.judges.urls()) == 2, 120, "the replica back")
                _wait(lambda: driver.step >= log["killed_at"] + 3, 120, "training after the crash")
                ray.get(driver.controller.scale.remote(judges=3))
                _wait(lambda: len(driver.judges.urls()) == 3, 120, "a third replica")
                log["scorer_urls_after_scale"] = scorer_urls_after(3)
            except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
                log["error"] = repr(exc)
            finally:
                driver.request_stop("test done")

        def scorer_urls_after(n: int) -> list[str]:
            _wait(lambda: len(scorer_urls()) == n, 60, f"the scorer on {n} endpoints")
            return scorer_urls()

        thread = threading.Thread(target=inject, daemon=True)
        thread.start()
        status = driver.run()
        thread.join(timeout=30)
        assert "error" not in log, log
        assert len(log["urls"]) == 2 and len(set(log["urls"])) == 2
        assert log["scorer_urls_while_down"] == [log["urls"][1]]  # urls are in replica order: judge-0 was killed
        assert len(log["scorer_urls_after_scale"]) == 3 and set(log["urls"]) < set(log["scorer_urls_after_scale"])
        judges = status["judges"]
        assert judges["server_restarts"] >= 1 and judges["desired"] == 3
        assert status["step"] > log["killed_at"] and status["invariant_ok"]
        # the crash cost at most the requests in flight on that server: no scored batch lost to it
        assert status["buffer"]["dropped"].get("judge_failed", 0) <= 8
        assert not driver.judges.replicas  # stopped with the run
