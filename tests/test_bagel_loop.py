"""The tiny random Bagel through the real driver (configs/tiny_bagel.yaml): local Ray on loopback, sampler,
scorer (Bagel's own understanding judging, SAM regions) and learner actors, a few online steps, a final
checkpoint that a second policy loads back."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("nemo_automodel.components.models.bagel",
                    reason="Bagel's modelling package is not installed: pip install --no-deps "
                           "'nemo-automodel==0.7.0' einops (make setup does it)")

from core.config_io import load_config  # noqa: E402
from srum.registry import compose  # noqa: E402


def test_tiny_bagel_trains_in_the_in_process_reference_loop(tmp_path):
    """The same algorithm in one process (srum.local.run_local): the default suite's Bagel loop."""
    import torch

    from srum.local import run_local

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: see tests/test_bagel_policy.py
    try:
        cfg = load_config("configs/tiny_bagel.yaml", [
            f"run.output_dir={tmp_path}", "run.max_steps=2", "policy.num_inference_steps=4", "judge.max_tokens=8",
            "regions.top_k=2"])
        run = run_local(cfg)
    finally:
        torch.set_num_threads(before)
    assert [int(r["step"]) for r in run.steps] == [1, 2] and run.policy.version == 2
    assert run.buffer["invariant_ok"] and run.buffer["trained"] == 8 and run.buffer["dropped_total"] == 0
    assert all(-1 <= r["mean_global_score"] <= 1 and r["loss"] > 0 for r in run.steps)


@pytest.mark.slow  # 55-66 s measured on a busy 2-core machine (Ray start-up, three actors importing the package)
@pytest.mark.timeout(900)
def test_tiny_bagel_runs_online_steps_through_the_driver(tmp_path):
    import ray
    import torch

    from cluster.driver import Driver
    from learner.learner import Learner

    cfg = load_config("configs/tiny_bagel.yaml", [
        f"run.output_dir={tmp_path}", "run.name=bagel-e2e", "run.max_steps=3", "run.refresh_every=3",
        "policy.num_inference_steps=4", "judge.max_tokens=8", "regions.top_k=2", "learner.checkpoint_every=0",
    ])
    try:
        summary = Driver(cfg, compose(cfg)).run()
    finally:
        ray.shutdown()
    assert summary["step"] == 3 and summary["stop_reason"] == "max_steps" and summary["invariant_ok"] is True
    assert summary["judge_failed"] == 0  # Bagel's understanding answers in the protocol the parser reads
    assert summary["buffer"]["generated"] >= 12
    run_dir = tmp_path / "bagel-e2e"
    trains = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    assert len(trains) == 3 and all(r["loss"] > 0 and -1 <= r["mean_global_score"] <= 1 for r in trains)
    assert (run_dir / "gallery.html").exists()
    from bagel.policy import BagelPolicy

    base = BagelPolicy.from_config(cfg.policy)
    resumed = BagelPolicy.from_config(cfg.policy)
    learner = Learner(cfg, resumed)
    learner.resume(run_dir / "checkpoints")  # the final checkpoint fits a fresh Bagel learner
    assert learner.step == 3 and resumed.version >= 3
    trained, start = resumed.trainable_state()[1], base.trainable_state()[1]
    assert set(trained) == set(start) and not all(torch.equal(trained[k], start[k]) for k in start)
