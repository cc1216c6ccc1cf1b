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

from collections.abc import Mapping
from typing import Any

from actors.components import Bundle, Components
from bagel.bundle import BUNDLE as BAGEL
from core.config import DiffusersPolicyConfig, GroundingRegionsConfig, JudgeConfig, RegionsConfig, SRUMConfig
from core.config_io import ConfigError
from learner.base import Policy
from learner.policy import DiffusersPolicy
from rewards.judge import BaseJudge
from rewards.judge_hf import TransformersJudge
from rewards.judge_openai import OpenAIJudge
from rewards.regions import GroundingProposer, NoneProposer, RegionProposer, SamProposer
from shapes.bundle import BUNDLE as SHAPES

__all__ = ["BUNDLES", "compose", "make_judge", "make_proposer"]


def diffusers_policy(cfg: SRUMConfig, seed: int) -> Policy:
    assert isinstance(cfg.policy, DiffusersPolicyConfig)
    return DiffusersPolicy.from_config(cfg.policy, seed=seed)


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
    if cfg.run.eval_every and world.evaluator is None:
        raise ConfigError(f"run.eval_every needs an evaluator: policy.kind={cfg.policy.kind!r} has none (set it to 0)")
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
