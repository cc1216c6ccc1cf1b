"""The shapes world as one bundle for the composition root (:mod:`srum.registry`): policy kind
``shapes``, judge backend ``shapes``, region proposer ``components``, the held-out evaluator, the base
pretraining run once before the actors start, and the world's own training prompts."""

from __future__ import annotations

from actors.components import Bundle
from core.config import ComponentsRegionsConfig, ShapesJudgeConfig, ShapesPolicyConfig, SRUMConfig
from core.prompt_sets import PromptRecord
from learner.base import Policy
from rewards.judge import BaseJudge
from rewards.regions import RegionProposer
from shapes.evaluator import HeldoutEvaluator
from shapes.judge import ComponentsProposer, ShapesJudge
from shapes.world import prompt_records


def _policy_section(cfg: SRUMConfig) -> ShapesPolicyConfig:
    if not isinstance(cfg.policy, ShapesPolicyConfig):
        raise TypeError(f"the shapes bundle serves policy.kind='shapes', not {cfg.policy.kind!r}")
    return cfg.policy


def policy(cfg: SRUMConfig, seed: int) -> Policy:
    from shapes.pretrain import load_policy

    return load_policy(_policy_section(cfg), seed=seed)


def judge(cfg: ShapesJudgeConfig) -> BaseJudge:
    return ShapesJudge(cfg)


def proposer(cfg: ComponentsRegionsConfig, judge: BaseJudge) -> RegionProposer:
    return ComponentsProposer(cfg)


def prepare(cfg: SRUMConfig) -> None:
    """Pretrain (or find in the cache) the base once, so the actors only load it."""
    from shapes.pretrain import pretrain_base, settings_from_config

    print("srum: shapes world: preparing the pretrained base model (shipped, or trained once and cached)", flush=True)
    pretrain_base(*settings_from_config(_policy_section(cfg)))


def evaluator(cfg: SRUMConfig) -> HeldoutEvaluator:
    section = _policy_section(cfg)
    return HeldoutEvaluator(section.split_seed, seeds_per_prompt=cfg.run.eval_seeds,
                            guidance=section.eval_guidance_scale, min_per_category=cfg.run.eval_min_per_category)


def prompts(cfg: SRUMConfig) -> list[PromptRecord]:
    return prompt_records(_policy_section(cfg).split_seed, "train")


BUNDLE = Bundle("shapes", policies={"shapes": policy}, judges={"shapes": judge}, proposers={"components": proposer},
                prepare=prepare, evaluator=evaluator, prompts=prompts)
