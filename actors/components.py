"""What a world or model family contributes (:class:`Bundle`) and the parts one config resolves to
(:class:`Components`).

A :class:`Bundle` maps config tags to factories: policy kinds (``policy.kind``), judge backends
(``judge.backend``) and region proposers (``regions.proposer``), plus, for its policy kinds, a
``prepare`` step (e.g. pretraining a base once before any actor starts), an :class:`~learner.base.Evaluator`
and the world's own training prompts. The composition root (:mod:`srum.registry`) holds the bundles and
turns a config into :class:`Components`; the actors receive Components and build their parts from it, so
no actor, and nothing below, imports a world.

Every factory must be a module-level function or class (Ray pickles Components by reference into each
actor process).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from core.config import JudgeConfig, RegionsConfig, SRUMConfig
from core.prompt_sets import PromptRecord, load_prompt_source
from learner.base import Evaluator, Policy
from rewards.judge import BaseJudge
from rewards.regions import RegionProposer
from rewards.scorer import SampleScorer

__all__ = ["Bundle", "Components"]

PolicyFactory = Callable[[SRUMConfig, int], Policy]
JudgeFactory = Callable[[JudgeConfig], BaseJudge]
ProposerFactory = Callable[[RegionsConfig, BaseJudge], RegionProposer]


@dataclass(frozen=True)
class Bundle:
    """One world's or model family's implementations, keyed by the config tags they serve."""

    name: str
    policies: Mapping[str, PolicyFactory] = field(default_factory=dict)
    judges: Mapping[str, JudgeFactory] = field(default_factory=dict)
    proposers: Mapping[str, ProposerFactory] = field(default_factory=dict)
    prepare: Callable[[SRUMConfig], None] | None = None
    """Run once by the driver before any actor starts (for this bundle's policy kinds)."""
    evaluator: Callable[[SRUMConfig], Evaluator] | None = None
    """Held-out evaluation of this bundle's policy kinds (``run.eval_every``)."""
    prompts: Callable[[SRUMConfig], list[PromptRecord]] | None = None
    """The world's own training prompts (used when ``cluster.prompts.path`` is null)."""


@dataclass(frozen=True)
class Components:
    """The factories one config resolved to; cheap to pickle, builds each part where it is called."""

    cfg: SRUMConfig
    policy_factory: PolicyFactory
    judge_factory: JudgeFactory
    proposer_factory: ProposerFactory
    world: Bundle
    """The bundle that serves ``policy.kind`` (its prepare, evaluator and prompts)."""

    def policy(self, seed: int | None = None) -> Policy:
        """A fresh policy (``seed`` fixes tiny weights and the LoRA initialisation; default ``run.seed``)."""
        return self.policy_factory(self.cfg, self.cfg.run.seed if seed is None else seed)

    def judge(self) -> BaseJudge:
        return self.judge_factory(self.cfg.judge)

    def scorer(self, judge: BaseJudge | None = None) -> SampleScorer:
        """The per-sample scorer: ``judge`` (a new one when None), its region proposer, the reward map."""
        judge = judge if judge is not None else self.judge()
        return SampleScorer(judge, self.proposer_factory(self.cfg.regions, judge), self.cfg.reward,
                            keyword_filter=self.cfg.regions.keyword_filter, on_ambiguous=self.cfg.judge.on_ambiguous)

    def evaluator(self) -> Evaluator | None:
        return None if self.world.evaluator is None else self.world.evaluator(self.cfg)

    def prepare(self) -> None:
        if self.world.prepare is not None:
            self.world.prepare(self.cfg)

    def train_prompts(self) -> list[PromptRecord]:
        """The training prompts: ``cluster.prompts`` from a file, or the world's own when its path is null."""
        source = self.cfg.cluster.prompts
        if source.path is not None:
            return load_prompt_source(source)
        if self.world.prompts is None:
            raise ValueError(f"cluster.prompts.path is null but policy.kind={self.cfg.policy.kind!r} has no "
                             "prompts of its own: give a prompt file")
        records = self.world.prompts(self.cfg)
        if source.categories is not None:
            records = [r for r in records if r.category in set(source.categories)]
        return records[: source.limit] if source.limit is not None else records
