"""Weights pushed by the driver (cluster/push.py): through the object store by default, through the
learner's shared-memory files (shm), and by Ray Direct
Transport over gloo on this CPU (the NCCL path is the same code with another backend), with the group
rebuilt when a sampler joins. (A sampler that dies during an RDT transfer cannot be tested as a fallback:
Ray 2.60 kills both ends of a failed gloo/NCCL transfer, the learner included; see cluster/push.py.)"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from core.config_io import load_config
from srum.registry import compose
from tests.ray_cluster import local_ray

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("srum") as ray:
        yield ray


def run(ray, tmp_path, transport: str, grow_at: int | None = None, steps: int = 10) -> tuple[dict, object]:
    from cluster.driver import Driver

    cfg = load_config("configs/tiny_sd3.yaml", [
        f"run.output_dir={tmp_path}", f"run.name=push-{transport}", f"run.max_steps={steps}", "regions.proposer=none",
        "judge.mode=text", "judge.max_tokens=8", "reward.use_global=false", "policy.num_inference_steps=2",
        f"cluster.weight_transport={transport}", "cluster.num_samplers=2", "cluster.sampler_resources.num_cpus=0",
        "cluster.scorer_resources.num_cpus=0", "cluster.learner_resources.num_cpus=0", "learner.checkpoint_every=0"])
    driver = Driver(cfg, compose(cfg))
    if grow_at is not None:
        def grow() -> None:  # `srum scale --samplers 3` while it runs
            deadline = time.monotonic() + 120
            while driver.step < grow_at and time.monotonic() < deadline:
                time.sleep(0.05)
            ray.get(driver.controller.scale.remote(samplers=3))

        threading.Thread(target=grow, daemon=True).start()
    return driver.run(), driver


@pytest.mark.parametrize("transport", ["object_store", "shm"])
def test_pushes_reach_every_sampler(ray_local, tmp_path, transport):
    summary, driver = run(ray_local, tmp_path, transport)
    versions, counts = summary["sampler_versions"], summary["counts"]
    assert summary["step"] == 10 and summary["invariant_ok"]
    assert counts["weight_pushes"] >= 2 * 8 and counts.get("weight_push_failures", 0) == 0
    assert set(versions) == {"sampler-0", "sampler-1"} and min(versions.values()) >= 9
    if transport == "shm":  # most versions went through the files (a busy file sends one by the object store)
        assert counts["weight_shm_fallbacks"] <= 5, counts
        assert not [p for p in Path("/dev/shm").glob("srum-w-push-shm-*")]  # the learner's stop removed its pair


def test_gloo_pushes_and_a_group_that_cannot_grow_falls_back_to_the_object_store(ray_local, tmp_path):
    summary, driver = run(ray_local, tmp_path, "gloo", grow_at=2, steps=20)  # the scale applies within ~1 s
    counts, versions = summary["counts"], summary["sampler_versions"]
    assert summary["step"] == 20 and summary["invariant_ok"] and summary["num_samplers"] == 3
    assert driver.pusher.rebuilds >= 1 and counts["weight_pushes"] >= 2 * 8
    assert counts.get("weight_push_failures", 0) == 0
    # Ray 2.60's torch_gloo cannot grow a group: the third sampler is served by the object store instead
    assert driver.pusher.fallbacks == 1 and driver.pusher.transport == "object_store"
    assert min(versions.values()) >= 19 and versions["sampler-2"] >= 19
