"""The composition root: which implementation serves each config tag, and :func:`compose`, which turns a
config into the :class:`~actors.components.Components` the driver and the actors build from.

Bundles registered here (:data:`BUNDLES`):

- ``diffusers``: policy kinds ``sd3`` and ``flux`` (:class:`learner.policy.DiffusersPolicy`);
- ``judges``: judge backends ``openai`` (vLLM or any OpenAI-compatible server) and ``transformers``
  (in-process), and region proposers ``sam``, ``grounding`` and ``none``;
- ``shapes``: the embedded world (:mod:`shapes.bundle`): its policy, judge, components proposer,
  evaluator, base pretraining and prompts.

A new world or model family (Bagel, BLIP3o, ...) adds one :class:`~actors.components.Bundle` to
:data:`BUNDLES`; nothing else in the tree changes. This is the only module that imports worlds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import Any

from actors.components import Bundle, Components
from actors.evaluation import Grader, ImageEvaluator
from bagel.bundle import BUNDLE as BAGEL
from core.config import DiffusersPolicyConfig, GroundingRegionsConfig, JudgeConfig, RegionsConfig, SRUMConfig
from core.config_io import ConfigError
from core.prompt_sets import PromptRecord, load_prompt_source
from learner.base import Policy
from learner.policy import DiffusersPolicy
from rewards.evaluation import VLMGrader
from rewards.judge import BaseJudge
from rewards.judge_hf import TransformersJudge
from rewards.judge_openai import OpenAIJudge
from rewards.regions import GroundingProposer, NoneProposer, RegionProposer, SamProposer
from shapes.bundle import BUNDLE as SHAPES
from shapes.eval_grader import GeometricGrader
from shapes.world import prompt_records

__all__ = ["BUNDLES", "compose", "eval_judge_config", "eval_prompt_records", "image_evaluator", "make_grader",
           "make_judge", "make_proposer"]


def run_prompt_texts(cfg: SRUMConfig) -> list[str]:
    """Every prompt a policy of this run embeds: the training prompts, the evaluation prompts when the run
    evaluates, and '' (SD3's negative prompt); what ``policy.offload_text_encoders`` precomputes."""
    texts = [r.text for r in load_prompt_source(cfg.cluster.prompts)] if cfg.cluster.prompts.path else []
    if cfg.run.eval_every and cfg.eval.prompts.path:
        texts += [r.text for r in load_prompt_source(cfg.eval.prompts)]
    return [*dict.fromkeys(texts), ""]


def diffusers_policy(cfg: SRUMConfig, seed: int) -> Policy:
    assert isinstance(cfg.policy, DiffusersPolicyConfig)
    precompute = run_prompt_texts(cfg) if cfg.policy.offload_text_encoders else ()
    return DiffusersPolicy.from_config(cfg.policy, seed=seed, precompute=precompute)


def sam_proposer(cfg: object, judge: BaseJudge) -> RegionProposer:
    return SamProposer(cfg)


def grounding_proposer(cfg: GroundingRegionsConfig, judge: BaseJudge) -> RegionProposer:
    return GroundingProposer(cfg, judge)


def no_proposer(cfg: object, judge: BaseJudge) -> RegionProposer:
    return NoneProposer(cfg)


DIFFUSERS = Bundle("diffusers", policies={"sd3": diffusers_policy, "flux": diffusers_policy})
JUDGES = Bundle("judges", judges={"openai": OpenAIJudge, "transformers": TransformersJudge},
                proposers={"sam": sam_proposer, "grounding": grounding_proposer, "none": no_proposer})
BUNDLES: tuple[Bundle, ...] = (DIFFUSERS, JUDGES, SHAPES, BAGEL)


def _table(attr: str) -> dict[str, tuple[Bundle, object]]:
    out: dict[str, tuple[Bundle, object]] = {}
    for bundle in BUNDLES:
        table: Mapping[str, object] = getattr(bundle, attr)
        for tag, factory in table.items():
            if tag in out:
                raise RuntimeError(f"{attr} tag {tag!r} is registered by both {out[tag][0].name} and {bundle.name}")
            out[tag] = (bundle, factory)
    return out


def compose(cfg: SRUMConfig) -> Components:
    """The components ``cfg`` selects; a :class:`ConfigError` names any tag no bundle serves (e.g. a
    held-out evaluation for a policy kind without an evaluator)."""
    policies, judges, proposers = _table("policies"), _table("judges"), _table("proposers")
    errors = [f"{key}: no registered implementation for {tag!r} (registered: {', '.join(sorted(table))})"
              for key, tag, table in (("policy.kind", cfg.policy.kind, policies),
                                      ("judge.backend", cfg.judge.backend, judges),
                                      ("regions.proposer", cfg.regions.proposer, proposers)) if tag not in table]
    if errors:
        raise ConfigError(errors)
    world, policy_factory = policies[cfg.policy.kind]
    if cfg.run.eval_every and world.evaluator is None:  # no evaluator of its own: the VLM evaluator grades it
        check_image_evaluation(cfg)
        world = dataclasses.replace(world, evaluator=image_evaluator)
    if cfg.cluster.prompts.path is None and world.prompts is None:
        raise ConfigError(f"cluster.prompts.path: null means the world's own prompts, but policy.kind="
                          f"{cfg.policy.kind!r} has none; give a prompt file")
    return Components(cfg, policy_factory, judges[cfg.judge.backend][1], proposers[cfg.regions.proposer][1], world)


def make_judge(cfg: JudgeConfig) -> BaseJudge:
    """The judge a judge section selects (e.g. for a script or a test that needs only the judge)."""
    return _lookup("judges", "judge.backend", cfg.backend)(cfg)


def make_proposer(cfg: RegionsConfig, judge: BaseJudge | None = None) -> RegionProposer:
    """The region proposer a regions section selects; ``grounding`` needs the judge."""
    if cfg.proposer == "grounding" and judge is None:
        raise ValueError("regions.proposer='grounding' needs the judge (make_proposer(cfg, judge=...))")
    return _lookup("proposers", "regions.proposer", cfg.proposer)(cfg, judge)


def _lookup(attr: str, key: str, tag: str) -> Any:
    table = _table(attr)
    if tag not in table:
        raise ConfigError(f"{key}: no registered implementation for {tag!r} (registered: {', '.join(sorted(table))})")
    return table[tag][1]


# ------------------------------------------------------------------------------------------- evaluation
def _shapes_heldout(cfg: SRUMConfig) -> list[PromptRecord]:
    return prompt_records(cfg.policy.split_seed, "heldout")  # type: ignore[union-attr]


WORLD_EVAL_PROMPTS = {"shapes": _shapes_heldout}
"""Policy kinds whose world has its own evaluation prompts (used when eval.prompts.path is null)."""


def eval_judge_config(cfg: SRUMConfig) -> JudgeConfig:
    """The judge section the VLM evaluator grades with: ``judge``, with ``eval.judge_model`` /
    ``eval.judge_endpoints`` when set (e.g. a larger model than the reward's)."""
    update = {k: v for k, v in (("model", cfg.eval.judge_model), ("endpoints", cfg.eval.judge_endpoints)) if v}
    return cfg.judge.model_copy(update=update) if update else cfg.judge


def eval_prompt_records(cfg: SRUMConfig) -> list[PromptRecord]:
    """The evaluation prompts: ``eval.prompts`` from a file, or the world's held-out prompts (shapes)."""
    source = cfg.eval.prompts
    if source.path is not None:
        return load_prompt_source(source)
    if cfg.policy.kind not in WORLD_EVAL_PROMPTS:
        raise ConfigError(f"eval.prompts.path: policy.kind={cfg.policy.kind!r} has no evaluation prompts of its own; "
                          "give a prompt file (GenEval evaluation_metadata.jsonl, a T2I-CompBench JSON, or .txt)")
    records = WORLD_EVAL_PROMPTS[cfg.policy.kind](cfg)
    if source.categories is not None:
        unknown = sorted(set(source.categories) - {r.category for r in records})
        if unknown:
            raise ConfigError(f"eval.prompts.categories: {unknown} are not categories of the world's held-out prompts")
        records = [r for r in records if r.category in set(source.categories)]
    return records[: source.limit] if source.limit is not None else records


def make_grader(cfg: SRUMConfig) -> Grader:
    """The shapes world's geometric check for ``policy.kind=shapes``; otherwise the VLM grader over the
    evaluator's judge (:func:`eval_judge_config`)."""
    if cfg.policy.kind == "shapes":
        return GeometricGrader()
    return VLMGrader(make_judge(eval_judge_config(cfg)), mode=cfg.eval.mode, max_tokens=cfg.eval.max_tokens)


def check_image_evaluation(cfg: SRUMConfig) -> None:
    """Fail at start (a :class:`ConfigError`) when the VLM evaluator cannot run for this config."""
    if cfg.policy.kind != "shapes" and cfg.judge.backend == "shapes":
        raise ConfigError("evaluation: judge.backend='shapes' answers only the shapes world's reward protocol; "
                          "grade with an openai or transformers judge")
    if cfg.eval.prompts.path is None and cfg.policy.kind not in WORLD_EVAL_PROMPTS:
        raise ConfigError(f"run.eval_every: policy.kind={cfg.policy.kind!r} is evaluated by the VLM evaluator on "
                          "eval.prompts; set eval.prompts.path (e.g. GenEval's evaluation_metadata.jsonl)")


async def _judge_health(grader: Grader) -> None:
    if isinstance(grader, VLMGrader):
        await grader.judge.check_health()


async def _judge_close(grader: Grader) -> None:
    if isinstance(grader, VLMGrader):
        await grader.judge.aclose()


def image_evaluator(cfg: SRUMConfig) -> ImageEvaluator:
    """The evaluator of ``run.eval_every`` for worlds without their own: ``run.eval_seeds`` images per
    evaluation prompt, graded by :func:`make_grader`."""
    return ImageEvaluator(eval_prompt_records(cfg), partial(make_grader, cfg), k=cfg.run.eval_seeds,
                          seed=cfg.eval.seed, batch_size=cfg.eval.batch_size, guidance=cfg.policy.eval_guidance_scale,
                          prepare=_judge_health, close=_judge_close)
