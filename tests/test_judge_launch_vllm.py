"""Two judge replicas of vLLM's CPU packaging (tiny random Idefics3) launched by the run itself
(``judge.launch``): one is killed mid-run, the loop goes on against the other, and the killed one comes back.
Marked ``slow`` (two vLLM start-ups and a restart, about four minutes on two cores) and ``vllm``."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from core.config_io import load_config
from tests.ray_cluster import local_ray
from tests.vllm_server import (
    MAX_MODEL_LEN,
    SERVED_NAME,
    build_model_dir,
    vllm_python,
    vllm_unavailable_reason,
)

pytestmark = [pytest.mark.slow, pytest.mark.vllm, pytest.mark.timeout(900)]


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_vllm_replicas_one_killed_mid_run(tmp_path):
    reason = vllm_unavailable_reason()
    if reason:
        pytest.skip(reason)
    from cluster.driver import Driver
    from srum.registry import compose

    model_dir = build_model_dir(tmp_path / "tiny-idefics3")
    command = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", "{model}",
               "--served-model-name", "{served_model_name}", "--host", "{host}", "--port", "{port}",
               "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
               "--gpu-memory-utilization", "0.5", "--limit-mm-per-prompt", '{"image": 2, "video": 0}',
               "--structured-outputs-config", '{"backend": "xgrammar", "disable_any_whitespace": true}']
    with local_ray("srum", __name__) as ray:
        cfg = load_config("configs/tiny_sd3.yaml", [
            f"run.output_dir={tmp_path}", "run.name=vllm-judges", "run.max_steps=400", "regions.proposer=none",
            "judge.backend=openai", "judge.mode=logprob", f"judge.model={SERVED_NAME}", "judge.max_tokens=16",
            "judge.max_retries=2", "judge.backoff_s=0.1", "judge.timeout_s=30", "judge.on_ambiguous=use",
            "policy.num_inference_steps=2", "learner.checkpoint_every=0",
            "cluster.sampler_resources.num_cpus=0", "cluster.scorer_resources.num_cpus=0",
            "cluster.learner_resources.num_cpus=0"])
        launch = {"replicas": 2, "model": str(model_dir), "num_gpus": 0, "num_cpus": 0, "ready_timeout_s": 400,
                  "command": command, "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
                                              "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "PYTHONPATH": None}}
        cfg = cfg.model_validate({**cfg.model_dump(), "judge": {**cfg.judge.model_dump(exclude={"endpoints"}),
                                                                "launch": launch}})
        driver = Driver(cfg, compose(cfg))
        log: dict = {}

        def inject() -> None:
            try:
                _wait(lambda: driver.step >= 2, 300, "training with two vLLM judges")
                log["urls"] = driver.judges.urls()
                info = ray.get(driver.judges.replicas["judge-0"].handle.info.remote())
                os.killpg(info["pid"], signal.SIGKILL)  # the server and its engine process crash
                log["killed_at"] = driver.step
                _wait(lambda: len(driver.judges.urls()) == 1, 60, "the dead replica leaving the list")
                _wait(lambda: driver.step >= log["killed_at"] + 2, 240, "training on the other replica")
                log["step_while_down"] = driver.step
                _wait(lambda: len(driver.judges.urls()) == 2, 400, "the killed replica back")
            except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
                log["error"] = repr(exc)
            finally:
                driver.request_stop("test done")

        thread = threading.Thread(target=inject, daemon=True)
        thread.start()
        status = driver.run()
        thread.join(timeout=30)
        assert "error" not in log, log
        assert len(set(log["urls"])) == 2 and log["step_while_down"] >= log["killed_at"] + 2
        assert status["judges"]["server_restarts"] >= 1 and status["invariant_ok"]
        assert status["trained"] > 0
