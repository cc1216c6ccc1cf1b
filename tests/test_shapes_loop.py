"""The embedded default (the shapes world) through the real driver: local Ray, pretrained base (a tiny
pretraining budget in a temporary cache), learned judge, held-out evaluation at start, during and at the end."""

from __future__ import annotations

import json

import pytest

from core.config_io import load_config
from srum.registry import compose


@pytest.mark.slow  # ~2 min on a quiet 2-core machine (local Ray, pretraining, 3 evaluations)
@pytest.mark.timeout(900)
def test_default_config_runs_the_shapes_loop_with_heldout_evaluation(tmp_path):
    import ray

    from cluster.driver import Driver

    cfg = load_config("configs/default.yaml", [
        f"run.output_dir={tmp_path}", "run.name=shapes-test", "run.max_steps=4", "run.eval_every=2",
        "run.eval_seeds=1", "policy.pretrain_steps=20", f"policy.pretrain_cache_dir={tmp_path / 'cache'}",
        "policy.num_inference_steps=4", "learner.batch_size=4", "cluster.sample_batch_size=4",
    ])
    try:
        summary = Driver(cfg, compose(cfg)).run()
    finally:
        ray.shutdown()
    assert summary["step"] == 4 and summary["invariant_ok"] is True
    assert summary["stop_reason"] == "max_steps"
    assert summary["buffer"]["generated"] >= 16
    assert summary["judge_failed"] == 0  # the learned judge answers in the protocol the parser reads
    run_dir = tmp_path / "shapes-test"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]  # start, every 2 steps, end
    assert all(0.0 <= e["overall"] <= 1.0 and e["n"] == 66 for e in evals)
    trains = [r for r in rows if r["kind"] == "train"]
    assert all(r["mean_global_score"] is not None and -1 <= r["mean_global_score"] <= 1 for r in trains)
    assert summary["heldout"]["step"] == 4
    assert (run_dir / "curves.png").exists() and (run_dir / "gallery.html").exists()
    assert list((tmp_path / "cache").rglob("*.safetensors"))  # the base was pretrained into the given cache
