"""Faults injected into the real driver on a local Ray (127.0.0.1), tiny SD3 and a fake OpenAI judge: a
learner crash with a slow restart, a judge outage, actors whose restarts are exhausted; and the pool's
handling of restarting, dead and failing actors. Each of these broke the loop before issue 13."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from cluster.pool import ActorPool
from core.config_io import load_config
from srum.registry import compose, diffusers_policy
from tests.judge_fake_server import FakeOpenAIServer
from tests.ray_cluster import local_ray

pytestmark = pytest.mark.timeout(600)
SLOW_RESTART = Path(tempfile.gettempdir()) / f"srum-test-slow-restart-{os.getuid()}"  # seen by every process


def slow_policy(cfg, seed):
    """The tiny SD3 policy; while the marker file exists, building it takes 6 s (a big model reloading)."""
    if SLOW_RESTART.exists():
        time.sleep(6)
    return diffusers_policy(cfg, seed)


class Flaky:
    """A stand-in actor: ``work`` takes a while, ``fail`` raises, ``ping`` answers once it is up."""

    def __init__(self, boot_s: float = 0.0):
        time.sleep(boot_s)

    def ping(self) -> str:
        return "pong"

    def work(self, seconds: float = 0.0) -> int:
        time.sleep(seconds)
        return os.getpid()

    def fail(self) -> None:
        raise ValueError("broken call")

    def stop(self) -> dict:
        return {}


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("srum", __name__) as ray:
        yield ray


def _wait(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout} s")


def test_pool_holds_back_restarting_failing_and_dead_actors(ray_local):
    ray = ray_local
    pool = ActorPool("flaky", lambda aid: ray.remote(Flaky).options(num_cpus=0, max_restarts=1).remote(2.0),
                     max_in_flight_per_actor=1)
    pool.scale_to(1)
    member = pool.pick()
    ray.get(member.handle.ping.remote())
    pool.started(member)
    call = member.handle.work.remote(5.0)
    ray.kill(member.handle, no_restart=False)  # Ray restarts it (2 s boot)
    with pytest.raises(ray.exceptions.ActorUnavailableError) as err:
        ray.get(call)
    assert pool.finished(member.actor_id, error=err.value) is False
    assert pool.pick() is None  # restarting: no work for it (before: a spin of failing calls)
    _wait(lambda: (pool.probe(), pool.pick())[1] is not None, what="the restarted actor answering a ping")
    pool.started(member)
    with pytest.raises(ray.exceptions.RayTaskError) as err:
        ray.get(member.handle.fail.remote())
    pool.finished(member.actor_id, error=err.value)
    assert pool.pick() is None and member.ready_at > time.monotonic()  # backing off after a failing call
    ray.kill(member.handle, no_restart=True)  # asynchronous: a ping right after may still be answered
    err = None
    for _ in range(100):
        try:
            ray.get(member.handle.ping.remote())
            time.sleep(0.1)
        except ray.exceptions.ActorDiedError as exc:
            err = exc
            break
    assert err is not None
    pool.started(member)
    assert pool.finished(member.actor_id, error=err) is True  # dead for good: removed, once
    assert pool.size() == 0 and pool.dead == 1 and pool.finished(member.actor_id, error=err) is False


def test_driver_survives_a_learner_restart_a_judge_outage_and_a_dead_sampler(ray_local, tmp_path):
    from cluster.driver import Driver

    SLOW_RESTART.unlink(missing_ok=True)
    server = FakeOpenAIServer(answer=lambda body: "Score: 0.5\nReason: fine").start()
    cfg = load_config("configs/tiny_sd3.yaml", [
        f"run.output_dir={tmp_path}", "run.name=faults", "run.max_steps=36", "regions.proposer=none",
        "judge.backend=openai", "judge.mode=text", f"judge.endpoints=[{server.base_url}]", "judge.max_retries=1",
        "judge.backoff_s=0.05", "judge.timeout_s=5", "judge.max_tokens=16", "cluster.num_samplers=2",
        "cluster.max_restarts=2", "learner.checkpoint_every=4", "cluster.max_staleness=100",
        "cluster.judge_outage_pause_s=1", "cluster.learner_restart_timeout_s=120", "policy.num_inference_steps=2",
        "cluster.sampler_resources.num_cpus=0", "cluster.scorer_resources.num_cpus=0",
        "cluster.learner_resources.num_cpus=0"])
    driver = Driver(cfg, dataclasses.replace(compose(cfg), policy_factory=slow_policy))
    log: dict = {}

    def inject() -> None:
        try:
            _wait(lambda: driver.step >= 6, 180, "step 6")
            SLOW_RESTART.touch()  # only the restarted learner is built after this
            log["killed_at"] = driver.step
            ray_local.kill(driver.learner, no_restart=False)
            _wait(lambda: driver.counts["learner_restarts"] == 1, 120, "the learner back")
            SLOW_RESTART.unlink(missing_ok=True)
            _wait(lambda: driver.step >= log["killed_at"] + 2, 120, "training after the restart")
            server.stop()  # the judge is down for 30 s
            log["outage_from"] = driver.buffer.stats()["generated"]
            time.sleep(30)
            log["outage_generated"] = driver.buffer.stats()["generated"] - log["outage_from"]
            server.start()
            _wait(lambda: driver.breaker.pauses >= 1 and driver.step >= 20, 180, "training after the outage")
            ray_local.kill(driver.samplers.members["sampler-1"].handle, no_restart=True)  # dead for good
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            log["error"] = repr(exc)
            driver.request_stop("fault injection failed")

    thread = threading.Thread(target=inject, daemon=True)
    thread.start()
    try:
        summary = driver.run()
    finally:
        thread.join(timeout=5)
        server.close()
        SLOW_RESTART.unlink(missing_ok=True)
    assert "error" not in log, log
    print(f"\nfaults: {log}; counts {summary['counts']}; dropped {summary['buffer']['dropped']}; "
          f"judge_outage {summary['judge_outage']}")
    assert summary["stop_reason"] == "max_steps" and summary["step"] == 36 and summary["invariant_ok"]
    counts, buf = summary["counts"], summary["buffer"]
    # the learner crash: one restart, no failure count, the run went on from the checkpoint
    assert counts["learner_restarts"] == 1 and counts.get("learner_failures", 0) == 0
    events = [json.loads(line) for line in (tmp_path / "faults" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e["kind"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["to_step"] % 4 == 0
    assert rollbacks[0]["to_step"] <= rollbacks[0]["from_step"] and rollbacks[0]["down_s"] >= 5
    assert buf["dropped"].get("rolled_back", 0) == 4 * (rollbacks[0]["from_step"] - rollbacks[0]["to_step"])
    # the outage: counted failures, equal to the buffer's, and sampling paused instead of feeding the drop
    assert summary["judge_failed"] == buf["dropped"]["judge_failed"] > 0
    assert summary["judge_outage"]["pauses"] >= 1 and log["outage_generated"] < 60, log
    # the dead sampler: removed once, the run went on with the other, bounded failures
    assert counts["sampler_dead"] == 1 and summary["num_samplers"] == 1 and counts["sampler_failures"] <= 4
    assert counts["images"] == buf["generated"]  # every generated image is accounted for
