"""Bagel as one bundle for the composition root (:mod:`srum.registry`): policy kind ``bagel`` and judge
backend ``bagel`` (Bagel's understanding, in-process). Regions come from the generic proposers: ``sam``
(what the paper uses for Bagel) or ``grounding``, which asks the judge, so with ``judge.backend: bagel``
Bagel's own grounding proposes the boxes. No held-out evaluator and no prompts of its own (a prompt
file, e.g. T2I-CompBench's training split). ``prepare`` checks, before any actor starts, that the
modelling package imports and that a Bagel judge judges with the policy's own weights."""

from __future__ import annotations

from pathlib import Path

from actors.components import Bundle
from bagel.backend import nemo_bagel
from core.config import BagelJudgeConfig, BagelPolicyConfig, SRUMConfig
from core.config_io import ConfigError
from learner.base import Policy
from rewards.judge import BaseJudge

__all__ = ["BUNDLE", "judge", "policy", "prepare", "same_weights_error"]


def _policy_section(cfg: SRUMConfig) -> BagelPolicyConfig:
    if not isinstance(cfg.policy, BagelPolicyConfig):
        raise TypeError(f"the bagel bundle serves policy.kind='bagel', not {cfg.policy.kind!r}")
    return cfg.policy


def policy(cfg: SRUMConfig, seed: int) -> Policy:
    from bagel.policy import BagelPolicy

    return BagelPolicy.from_config(_policy_section(cfg), seed=seed)


def judge(cfg: BagelJudgeConfig) -> BaseJudge:
    from bagel.judge import BagelJudge

    return BagelJudge(cfg)


def _source(pretrained: str | None, tiny_seed: int) -> str:
    return f"checkpoint {Path(pretrained).expanduser().resolve()}" if pretrained else f"tiny model of tiny_seed={tiny_seed}"


def same_weights_error(policy_cfg: BagelPolicyConfig, judge_cfg: BagelJudgeConfig) -> str | None:
    """Why a Bagel judge would not be the policy's own understanding module, or None when it is."""
    mine = _source(policy_cfg.pretrained, policy_cfg.tiny_seed)
    theirs = _source(judge_cfg.pretrained, judge_cfg.tiny_seed)
    if mine == theirs:
        return None
    return (f"judge.backend='bagel' judges with the policy's own understanding module, but the policy is the "
            f"{mine} and the judge the {theirs}: set judge.pretrained / judge.tiny_seed to the policy's")


def prepare(cfg: SRUMConfig) -> None:
    """Fail early (in the driver) when the modelling package is missing or the judge is another model."""
    nemo_bagel()
    section = _policy_section(cfg)
    if isinstance(cfg.judge, BagelJudgeConfig):
        problem = same_weights_error(section, cfg.judge)
        if problem:
            raise ConfigError(problem)


BUNDLE = Bundle("bagel", policies={"bagel": policy}, judges={"bagel": judge}, prepare=prepare)
