"""End to end through `ray job submit`: a real Ray head on loopback, the default config with a small
budget, and the things a user does to a running job (scale up and down, lose a sampler, stop, resume).

One job does the live operations (so the suite pays the start-up cost once); a second job resumes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from tests.ray_cluster import REPO, start_ray_head, stop_ray_head

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def head():
    h = start_ray_head()
    yield h
    stop_ray_head(h)


def submit(head, run_dir: Path, *overrides: str):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(head.dashboard_url)
    summary = run_dir / f"summary-{len(list(run_dir.glob('summary-*')))}.json"
    entry = ("python -m srum.main --config configs/tiny_sd3.yaml "
             f"run.output_dir={run_dir} run.name=e2e --summary-json {summary} " + " ".join(overrides))
    env = {"working_dir": str(REPO), "excludes": [".venv", ".venv-vllm", "runs", ".git", ".hypothesis",
                                                  ".pytest_cache"]}
    deadline = time.monotonic() + 90
    while True:  # the node's job agent comes up a few seconds after the job API
        try:
            return client, client.submit_job(entrypoint=entry, runtime_env=env), summary
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def wait_job(client, job_id: str, timeout: float = 600) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value if hasattr(status, "value") else status)
        time.sleep(1)
    client.stop_job(job_id)
    pytest.fail(f"job {job_id} did not finish in {timeout} s; logs:\n{client.get_job_logs(job_id)[-4000:]}")


def wait_status(head, predicate, job=None, timeout: float = 300) -> dict:
    """Poll `srum status --json` until predicate(status) holds (fails at once if the job ended)."""
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if job is not None and job[0].get_job_status(job[1]) in (JobStatus.FAILED, JobStatus.STOPPED):
            pytest.fail(f"job ended early; logs:\n{job[0].get_job_logs(job[1])[-4000:]}")
        out = head.cli("status", "--json")
        if out.returncode == 0 and out.stdout.strip().startswith("{"):
            last = json.loads(out.stdout)
            if predicate(last):
                return last
        time.sleep(1)
    pytest.fail(f"status condition not reached in {timeout} s; last status: {last}")


def test_job_scale_kill_stop_then_resume(head, tmp_path):
    import ray

    # ---- job 1: open-ended budget; we drive it: scale up, kill a sampler, scale down, stop
    # enough batches in flight that every sampler always has a call queued: a kill always interrupts work
    client, job_id, summary_path = submit(head, tmp_path, "run.max_steps=400", "learner.checkpoint_every=5",
                                          "cluster.max_staleness=100", "cluster.max_in_flight_batches=8")
    try:
        wait_status(head, lambda s: s["step"] >= 2, (client, job_id))
        assert head.cli("scale", "--samplers", "2", "--scorers", "2").returncode == 0
        wait_status(head, lambda s: s["num_samplers"] == 2 and s["num_scorers"] == 2, (client, job_id))

        ray.init(address=head.gcs_address, namespace="srum", log_to_driver=False)
        try:  # Ray restarts them (samplers re-sync); a kill between two calls interrupts nothing: once more
            for name, role in (("srum-e2e-sampler-0", "sampler"), ("srum-e2e-scorer-0", "scorer")):
                for _ in range(2):
                    ray.kill(ray.get_actor(name, namespace="srum"), no_restart=False)
                    try:
                        wait_status(head, lambda s, r=role: s["counts"].get(f"{r}_failures", 0) > 0, timeout=30)
                        break
                    except pytest.fail.Exception:
                        continue
        finally:
            ray.shutdown()
        before = wait_status(head, lambda s: True)["step"]
        after = wait_status(head, lambda s: s["step"] >= before + 3 and s["counts"].get("images", 0) > 0)
        assert after["step"] >= before + 3  # the loop kept training after losing a sampler and a scorer
        # the restarted sampler re-synced: its own version moved past the base again
        wait_status(head, lambda s: s["sampler_versions"].get("sampler-0", 0) > 0)

        assert head.cli("scale", "--samplers", "1").returncode == 0
        wait_status(head, lambda s: s["num_samplers"] == 1)
        assert head.cli("stop").returncode == 0
        state = wait_job(client, job_id)
    except BaseException:
        client.stop_job(job_id)
        raise
    logs = client.get_job_logs(job_id)
    assert state == "SUCCEEDED", logs[-4000:]

    summary = json.loads(summary_path.read_text())
    run_dir = tmp_path / "e2e"
    assert summary["stop_reason"] == "stop requested"
    assert summary["step"] > 0
    assert summary["policy_version"] > 0
    assert summary["invariant_ok"] is True
    buf = summary["buffer"]
    assert buf["generated"] == buf["trained"] + buf["in_buffer"] + sum(buf["dropped"].values())
    assert buf["trained"] >= summary["step"] * 4 - 4 * 4  # partial batches only at the edges
    assert any(v > 0 for v in summary["sampler_versions"].values()), summary["sampler_versions"]
    assert summary["counts"].get("sampler_failures", 0) > 0 and summary["counts"].get("scorer_failures", 0) > 0
    assert summary["judge_failed"] == buf["dropped"].get("judge_failed", 0)
    assert summary["counts"]["images"] == buf["generated"]  # every image the samplers returned is accounted for
    assert (run_dir / "checkpoints" / "latest").exists()
    assert (run_dir / "metrics.jsonl").exists() and (run_dir / "gallery.html").exists()
    assert (run_dir / "curves.png").exists()
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    scales = [e for e in events if e.get("kind") == "scale"]
    assert {(e["role"], e["to"]) for e in scales} >= {("sampler", 2), ("scorer", 2), ("sampler", 1)}

    # ---- metrics reached the node's export port (Prometheus names: ray_srum_*)
    deadline = time.monotonic() + 60
    text = ""
    while time.monotonic() < deadline:
        text = head.metrics_text()
        if "ray_srum_samples_trained" in text and "ray_srum_images_generated" in text:
            break
        time.sleep(2)
    for name in ("ray_srum_images_generated", "ray_srum_samples_scored", "ray_srum_samples_trained",
                 "ray_srum_judge_requests"):
        assert name in text, f"{name} not exported"
    trained = sum(float(v) for v in re.findall(r"^ray_srum_samples_trained_total\{[^}]*\} ([0-9.e+]+)", text, re.M))
    assert trained > 0

    # ---- job 2: resume the same run; it continues from the final checkpoint
    step1 = summary["learner"]["step"]
    client, job_id, summary_path = submit(head, tmp_path, f"run.max_steps={step1 + 3}")
    state = wait_job(client, job_id)
    assert state == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    summary2 = json.loads(summary_path.read_text())
    assert summary2["learner"]["resumed_from"] is not None
    assert summary2["step"] == step1 + 3
    assert summary2["policy_version"] > summary["policy_version"]
    assert summary2["counts"]["images"] > summary["counts"]["images"]  # the counters resumed too

    # ---- job 3 dies with its driver (SIGKILL); job 4, the same command submitted again, resumes it
    step2 = summary2["step"]
    client, job_id, _ = submit(head, tmp_path, "run.max_steps=400", "learner.checkpoint_every=3")
    try:
        wait_status(head, lambda s: s["step"] >= step2 + 7, (client, job_id))
        os.kill(int(client.get_job_info(job_id).driver_info.pid), signal.SIGKILL)
        state = wait_job(client, job_id, timeout=120)
    except BaseException:
        client.stop_job(job_id)
        raise
    assert state == "FAILED"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    checkpointed = int(latest.split("_")[1])
    assert checkpointed >= step2 + 6  # job 3 checkpointed before it died
    client, job_id, summary_path = submit(head, tmp_path, f"run.max_steps={checkpointed + 2}")
    state = wait_job(client, job_id)
    assert state == "SUCCEEDED", client.get_job_logs(job_id)[-4000:]
    summary4 = json.loads(summary_path.read_text())
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [e for e in starts if e.get("kind") == "start"]
    assert starts[-1]["resumed_at_step"] == checkpointed and summary4["step"] == checkpointed + 2
