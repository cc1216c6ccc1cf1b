"""Rounds mode (``cluster.mode: rounds``): the phase bookkeeping, and the real driver on a local Ray with
tiny SD3 and a fake OpenAI judge: each round's pool comes from one frozen version, is trained for
``round_epochs`` epochs (every kept sample served that often, counted once), and the next round generates
with the weights published at the end of the pool."""

from __future__ import annotations

import json

import pytest

from cluster.rounds import Rounds
from core.config_io import ConfigError, load_config
from tests.judge_fake_server import FakeOpenAIServer, scorer_answer
from tests.ray_cluster import local_ray

pytestmark = pytest.mark.timeout(600)


def test_phases_follow_the_pool():
    r = Rounds(samples=10, epochs=3)
    assert r.samples_left() == 10 and r.phase == "generate"
    r.submitted_batch(4)
    r.submitted_batch(6)
    assert r.samples_left() == 0
    idle = {"generating": False, "training": False, "pushing": False}
    assert not r.advance(kept=9, **{**idle, "generating": True}, version=0, step=3)  # a batch is still judged
    assert r.advance(kept=9, **idle, version=0, step=3)
    assert r.phase == "train" and r.pool == 9 and r.samples_left() == 0  # nothing more is generated while training
    assert not r.advance(kept=2, **idle, version=5, step=8)  # samples left to train on
    assert not r.advance(kept=0, **{**idle, "training": True}, version=5, step=9)
    assert r.advance(kept=0, **idle, version=5, step=10) and r.phase == "sync"
    assert not r.advance(kept=0, **{**idle, "pushing": True}, version=8, step=10)
    assert r.advance(kept=0, **idle, version=8, step=10)
    assert (r.index, r.version, r.phase, r.samples_left()) == (1, 8, "generate", 10)
    assert r.completed == [{"round": 0, "version": 0, "pool": 9, "steps": 7}]
    r.restore({"index": 4}, version=30)
    assert (r.index, r.version, r.phase) == (4, 30, "generate")
    with pytest.raises(ValueError):
        Rounds(0, 1)


def test_the_buffer_must_hold_a_pool():
    with pytest.raises(ConfigError, match="round_samples"):
        load_config(None, ["cluster.mode=rounds", "cluster.round_samples=300", "cluster.buffer_capacity=256"])


def test_driver_trains_each_pool_for_its_epochs_then_generates_with_the_new_weights(tmp_path):
    from cluster.driver import Driver
    from srum.registry import compose

    server = FakeOpenAIServer(answer=scorer_answer).start()
    try:
        with local_ray("srum", __name__):
            cfg = load_config("configs/tiny_sd3.yaml", [
                f"run.output_dir={tmp_path}", "run.name=rounds", "run.max_steps=12", "regions.proposer=none",
                "judge.backend=openai", "judge.mode=text", f"judge.endpoints=[{server.base_url}]",
                "judge.max_tokens=16", "policy.num_inference_steps=2", "learner.checkpoint_every=0",
                "cluster.mode=rounds", "cluster.round_samples=12", "cluster.round_epochs=2",
                "cluster.sample_batch_size=4", "learner.batch_size=4", "cluster.num_samplers=2",
                "cluster.sampler_resources.num_cpus=0", "cluster.scorer_resources.num_cpus=0",
                "cluster.learner_resources.num_cpus=0"])
            driver = Driver(cfg, compose(cfg))
            status = driver.run()
    finally:
        server.close()
    lines = [json.loads(line) for line in (tmp_path / "rounds" / "metrics.jsonl").read_text().splitlines()]
    rounds = [r for r in lines if r.get("kind") == "round"]
    trains = [r for r in lines if r.get("kind") == "train"]
    buf = status["buffer"]
    # two rounds of 12 judged samples, 2 epochs of 3 batches of 4 each: 12 steps, every sample served twice
    assert status["step"] == 12 and buf["generated"] == 24 and buf["trained"] == 24 and buf["served"] == 48
    assert buf["dropped"].get("stale", 0) == 0 and status["invariant_ok"]
    starts = [r for r in rounds if r["phase"] == "train"]
    assert [(r["round"], r["version"], r["pool"]) for r in starts] == [(0, 0, 12), (1, 6, 12)]
    # each pool was generated with one version and trained over 6 steps: the lag after step k of a round is k
    assert [round(t["mean_lag"]) for t in trains] == [1, 2, 3, 4, 5, 6] * 2
    assert status["mode"] == "rounds" and status["round"]["round"] == 1 and status["round"]["phase"] == "sync"
