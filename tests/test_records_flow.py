"""One sample record from the sampler to the loss: the in-process reference loop, and the same two halves
wrapped by the actors (header by value, images and latents by reference, tensors owned by the caller)."""

from __future__ import annotations

import dataclasses

import pytest

from actors.components import Components
from actors.rollout import generate, rollout
from core.config_io import load_config
from core.prompt_sets import PromptCycler
from core.records import DropReason, SampleHeader, SampleTensors, TrainSample, collate
from learner.base import SampleBatch
from rewards.judge import JudgeResult
from rewards.judge_hf import TransformersJudge
from srum.local import run_local
from srum.registry import compose
from tests.ray_cluster import local_ray

# use_global off: the random tiny judge's global score (often exactly 0, a drop) does not decide what trains
OVERRIDES = ["regions.proposer=none", "judge.mode=text", "judge.max_tokens=16", "cluster.sample_batch_size=2",
             "learner.batch_size=2", "learner.warmup_steps=0", "policy.num_inference_steps=2", "reward.use_global=false"]


@pytest.fixture(scope="module")
def parts() -> Components:
    return compose(load_config("configs/tiny_sd3.yaml", OVERRIDES))


def test_rollout_gives_one_train_sample_per_image_and_collate_is_the_one_conversion(parts):
    policy, scorer = parts.policy(), parts.scorer()
    prompts, seeds = PromptCycler(parts.train_prompts(), 0).take(3)
    header, batch = generate(policy, prompts, seeds, "s0")
    assert isinstance(header, SampleHeader) and isinstance(batch, SampleBatch)
    assert header.n == 3 and header.seeds == tuple(seeds) and header.policy_version == policy.version
    samples = rollout(policy, scorer, prompts, seeds)
    assert [s.record.prompt for s in samples] == prompts and [s.record.seed for s in samples] == seeds
    assert all(not s.record.dropped and isinstance(s.tensors, SampleTensors) for s in samples)
    assert all(s.tensors.x0.shape == batch.x0.shape[1:] and s.tensors.R.shape == batch.x0.shape[-2:] for s in samples)
    b = collate(samples)
    assert b.prompts == [p.text for p in prompts] and b.alpha.tolist() == [1.0] * 3


class ZeroJudge(TransformersJudge):
    """Every global score is exactly 0: the authors' drop rule drops every sample."""

    async def score_global(self, image, prompt):
        return JudgeResult(score=0.0)


def zero_judge_parts(parts: Components, max_steps: int = 1) -> Components:
    cfg = parts.cfg.model_copy(update={"reward": parts.cfg.reward.model_copy(update={"use_global": True}),
                                       "run": parts.cfg.run.model_copy(update={"max_steps": max_steps})})
    return dataclasses.replace(compose(cfg), judge_factory=ZeroJudge)


def test_a_dropped_sample_keeps_its_reason_and_no_tensors(parts):
    zero = zero_judge_parts(parts)
    prompts, seeds = PromptCycler(parts.train_prompts(), 0).take(2)
    samples = rollout(zero.policy(), zero.scorer(), prompts, seeds)
    assert [s.record.drop_reason for s in samples] == [DropReason.GLOBAL_SCORE_ZERO] * 2
    assert all(s.tensors is None and s.record.global_score == 0.0 for s in samples)
    with pytest.raises(RuntimeError, match="no trainable sample"):  # a judge that drops all: a clear stop
        run_local(zero.cfg, zero)
    uniform = run_local(zero.cfg, zero, weighting="uniform")  # self-SFT trains on every generated sample
    assert uniform.learner.step == 1 and uniform.buffer["trained"] == 2 and uniform.buffer["invariant_ok"]


def test_run_local_trains_with_exact_accounting(parts):
    seen = []
    run = run_local(parts.cfg.model_copy(update={"run": parts.cfg.run.model_copy(update={"max_steps": 3})}),
                    on_step=seen.append)
    assert run.learner.step == 3 and run.policy.version == 3 and len(run.steps) == len(seen) == 3
    b = run.buffer
    assert b["invariant_ok"] and b["trained"] == 3 * 2 and b["in_buffer"] == 0
    assert all(r["sample_s"] > 0 and r["score_s"] > 0 and r["train_s"] > 0 for r in run.steps)


@pytest.fixture(scope="module")
def ray_local():
    with local_ray("srum-test-records") as ray:
        yield ray


def test_the_actors_pass_headers_by_value_and_tensors_by_reference(ray_local, parts, tmp_path):
    from actors.learner_host import LearnerHost
    from actors.sampler import SamplerActor
    from actors.scorer import ScorerActor, ScoreSummary
    from actors.weights import WeightStore

    ray = ray_local
    store = ray.remote(WeightStore).options(num_cpus=0).remote()
    sampler = ray.remote(SamplerActor).options(num_cpus=0).remote(parts, "sampler-0", store)
    scorer = ray.remote(ScorerActor).options(num_cpus=0).remote(parts, "scorer-0")
    learner = ray.remote(LearnerHost).options(num_cpus=0).remote(parts, str(tmp_path), store)
    ray.get([learner.ping.remote(), scorer.start.remote()])
    prompts, seeds = PromptCycler(parts.train_prompts(), 0).take(2)
    header_ref, batch_ref = sampler.sample.options(num_returns=2).remote(prompts, seeds)
    header = ray.get(header_ref)  # the driver reads this; the batch stays in the object store
    assert isinstance(header, SampleHeader) and header.n == 2 and header.sampler_id == "sampler-0"
    summary_ref, *tensor_refs = scorer.score.options(num_returns=1 + header.n).remote(header, batch_ref)
    summary = ray.get(summary_ref)
    assert isinstance(summary, ScoreSummary) and len(summary.records) == 2 == len(tensor_refs)
    assert summary.preview is not None and summary.judge["requests"] == 0  # no global reward, no regions: no ask
    samples = [TrainSample(rec, None if rec.dropped else ref) for rec, ref in zip(summary.records, tensor_refs,
                                                                                 strict=True)]
    assert all(isinstance(s.tensors, ray.ObjectRef) for s in samples)  # nothing dropped (use_global off)
    result = ray.get(learner.train.remote([samples]))
    assert result.lost == [] and len(result.steps) == 1 and result.steps[0]["samples"] == 2
    assert result.steps[0]["policy_version"] == 1
    metrics = ray.get(sampler.get_metrics.remote())
    assert metrics["counters"]["srum_images_generated{actor=sampler-0}"] == 2.0
