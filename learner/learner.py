"""The SRUM learner: one reward-weighted flow-matching step per call (DESIGN §4).

A plain class (``cluster/`` makes it a Ray actor). Per :meth:`Learner.train_step`:

1. prompts -> cached frozen text conditioning (:meth:`Policy.encode`);
2. ``t ~ sample_timesteps`` (logit-normal with SD3's shift) and ``noise ~ N(0, I)``, both drawn from
   the learner's own seeded CPU generator (reproducible on any device, restored on resume);
3. ``x_t = (1 - t) x0 + t noise``; ``v = policy.velocity(x_t, t)`` (bf16 autocast on CUDA when
   ``mixed_precision`` is "auto"/"bf16");
4. ``srum_loss`` with each sample's reward map ``R`` and global weight ``alpha``;
5. backward, grad-norm clip, AdamW (linear warm-up then constant LR), optional EMA.

A non-finite loss or gradient norm skips the step: gradients are dropped, the optimiser, scheduler,
EMA and weights are left untouched, ``skipped_steps`` is incremented (the RNG draws of the skipped
step are consumed, so a resumed run replays the same sequence).

Counters: ``step`` counts optimiser steps that were applied (skipped steps do not count); the
policy's ``version`` is incremented with every applied step, i.e. whenever the weights change.
Publishing ``policy.trainable_state()`` every ``sync_every`` steps is the caller's job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from cluster.config import LearnerConfig, PolicyConfig, SRUMConfig, config_hash
from learner.loss import rf_interpolate, sample_timesteps, srum_loss
from learner.policy import Policy

# Fields whose change alters the optimisation; resuming across a change of one of these is an error
# unless explicitly allowed (other config differences only warn).
TRAINING_FIELDS = {
    "policy": ("kind", "pretrained", "tiny", "dtype", "lora_rank", "lora_alpha", "lora_target_modules",
               "pretrain_steps", "pretrain_seed", "shapes_split_seed"),
    "learner": ("lr", "betas", "eps", "weight_decay", "warmup_steps", "grad_clip", "lambda_c",
                "weight_floor", "timestep_shift", "logit_mean", "logit_std", "ema_decay", "mixed_precision"),
}


@dataclass
class TrainBatch:
    """One learner batch: ``x0`` ``[B, C, h, w]`` normalised latents, ``R`` ``[B, h, w]`` reward maps
    on the latent grid, ``alpha`` ``[B]`` global weights."""

    prompts: list[str]
    x0: torch.Tensor
    R: torch.Tensor
    alpha: torch.Tensor

    @classmethod
    def coerce(cls, batch: Any) -> TrainBatch:
        """Accept a TrainBatch, a mapping or an object with the same fields (``weight_map`` is an
        alias of ``R``); validate shapes."""
        if isinstance(batch, cls):
            b = batch
        else:
            get = batch.get if isinstance(batch, Mapping) else (lambda k, d=None: getattr(batch, k, d))
            R = get("R")
            if R is None:
                R = get("weight_map")
            missing = [k for k, v in (("prompts", get("prompts")), ("x0", get("x0")), ("R", R),
                                      ("alpha", get("alpha"))) if v is None]
            if missing:
                raise ValueError(f"train batch is missing {missing}")
            b = cls(list(get("prompts")), get("x0"), R, torch.as_tensor(get("alpha"), dtype=torch.float32))
        n = len(b.prompts)
        if b.x0.ndim != 4 or b.x0.shape[0] != n:
            raise ValueError(f"x0 must be [B={n}, C, h, w], got {list(b.x0.shape)}")
        if b.R.ndim not in (3, 4) or b.R.shape[0] != n or tuple(b.R.shape[-2:]) != tuple(b.x0.shape[-2:]):
            raise ValueError(f"R must be [B, h, w] = {[n, *b.x0.shape[-2:]]}, got {list(b.R.shape)}")
        alpha = torch.as_tensor(b.alpha, dtype=torch.float32)
        if alpha.ndim == 0:
            alpha = alpha.expand(n)
        if alpha.shape != (n,):
            raise ValueError(f"alpha must be [B={n}], got {list(alpha.shape)}")
        b.alpha = alpha
        return b


class WarmupConstant:
    """LR factor: linear warm-up ``(s + 1) / warmup_steps`` for the first steps, then 1.0.

    A class (not a lambda) so ``LambdaLR.state_dict`` stores it as plain data.
    """

    def __init__(self, warmup_steps: int) -> None:
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return 1.0
        return min(1.0, (step + 1) / self.warmup_steps)


def training_hash(policy_cfg: PolicyConfig, learner_cfg: LearnerConfig) -> str:
    """sha256 over the :data:`TRAINING_FIELDS` of the policy and learner configs."""
    data = {
        "policy": {k: policy_cfg.model_dump(mode="json")[k] for k in TRAINING_FIELDS["policy"]},
        "learner": {k: learner_cfg.model_dump(mode="json")[k] for k in TRAINING_FIELDS["learner"]},
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Learner:
    """SRUM learner over a :class:`Policy` (see module docstring).

    ``cfg`` is an ``SRUMConfig`` (seed from ``run.seed``) or a ``(PolicyConfig, LearnerConfig)``
    pair (seed from ``seed``, default 0).
    """

    def __init__(self, cfg: SRUMConfig | tuple[PolicyConfig, LearnerConfig], policy: Policy,
                 seed: int | None = None) -> None:
        if isinstance(cfg, SRUMConfig):
            self.policy_cfg, self.cfg = cfg.policy, cfg.learner
            self.config_hash: str = config_hash(cfg)
            seed = cfg.run.seed if seed is None else seed
        else:
            self.policy_cfg, self.cfg = cfg
            self.config_hash = hashlib.sha256(
                (config_hash(self.policy_cfg) + config_hash(self.cfg)).encode()).hexdigest()
        self.seed = int(seed or 0)
        self.training_hash = training_hash(self.policy_cfg, self.cfg)
        self.policy = policy
        self.device = policy.device
        self.generator = torch.Generator("cpu").manual_seed(self.seed)
        self.param_names: list[str] = list(policy.named_trainable_parameters())
        self.params: list[torch.nn.Parameter] = policy.trainable_parameters()
        c = self.cfg
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, betas=tuple(c.betas), eps=c.eps,
                                           weight_decay=c.weight_decay)
        self.scheduler = LambdaLR(self.optimizer, WarmupConstant(c.warmup_steps))
        self.ema: list[torch.Tensor] | None = (
            [p.detach().float().clone() for p in self.params] if c.ema_decay else None)
        mp = c.mixed_precision
        use_bf16 = mp == "bf16" or (mp == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.step = 0
        self.skipped_steps = 0

    # -------------------------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, batch: TrainBatch | Mapping[str, Any] | Any) -> dict[str, float]:
        """One SRUM step on ``batch`` (prompts, x0, R, alpha); returns metrics:
        loss, l_r, l_ref, grad_norm, lr, step_time_s, samples, skipped, step, version."""
        t0 = time.perf_counter()
        b = TrainBatch.coerce(batch)
        n, dev, c = len(b.prompts), self.device, self.cfg
        x0 = b.x0.to(dev, torch.float32)
        cond = self.policy.encode(b.prompts)
        t = sample_timesteps(n, shift=c.timestep_shift, logit_mean=c.logit_mean, logit_std=c.logit_std,
                             generator=self.generator).to(dev)
        noise = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(dev)
        x_t = rf_interpolate(x0, noise, t)
        with self._autocast():
            v = self.policy.velocity(x_t, t, cond=cond)
        parts = srum_loss(v, noise, x0, b.R.to(dev), b.alpha.to(dev), lambda_c=c.lambda_c,
                          weight_floor=c.weight_floor)
        lr = self.scheduler.get_last_lr()[0]
        parts.total.backward()
        max_norm = c.grad_clip if c.grad_clip is not None else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        loss, l_r, l_ref, gnorm = torch.stack(
            [parts.total.detach().float(), parts.l_r, parts.l_ref, grad_norm.float()]).tolist()
        skipped = not (math.isfinite(loss) and math.isfinite(gnorm))
        if skipped:
            self.skipped_steps += 1
        else:
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                with torch.no_grad():
                    torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params],
                                         1.0 - float(c.ema_decay))
            self.step += 1
            self.policy.version += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss, "l_r": l_r, "l_ref": l_ref, "grad_norm": gnorm, "lr": lr,
            "step_time_s": time.perf_counter() - t0, "samples": float(n), "skipped": float(skipped),
            "step": float(self.step), "version": float(self.policy.version),
        }

    # ------------------------------------------------------------------------------------- EMA
    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """EMA of the trainable tensors (CPU copies, policy key names), or None when EMA is off."""
        if self.ema is None:
            return None
        return {k: e.detach().to("cpu", copy=True) for k, e in zip(self.param_names, self.ema, strict=True)}

    def load_ema_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.ema is None:
            raise ValueError("this learner has no EMA (learner.ema_decay is null)")
        bad = sorted(set(state) ^ set(self.param_names))[:5]
        if bad:
            raise ValueError(f"EMA state keys do not match the trainable parameters, e.g. {bad}")
        with torch.no_grad():
            for k, e in zip(self.param_names, self.ema, strict=True):
                if state[k].shape != e.shape:
                    raise ValueError(f"EMA tensor {k}: shape {tuple(state[k].shape)}, want {tuple(e.shape)}")
                e.copy_(state[k])

    # ----------------------------------------------------------------------------- checkpoints
    def checkpoint(self, root: str | Path) -> Path:
        """Save a checkpoint under ``root`` (see :mod:`learner.checkpoint`); returns the step dir."""
        from learner.checkpoint import save_checkpoint

        return save_checkpoint(root, self)

    def resume(self, root: str | Path, allow_config_change: bool = False) -> Path:
        """Restore the latest checkpoint under ``root`` (or a step dir); returns the step dir."""
        from learner.checkpoint import load_checkpoint

        return load_checkpoint(root, self, allow_config_change=allow_config_change)


def eval_flow_loss(policy: Policy, x0: torch.Tensor, prompts: Sequence[str], t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching MSE at fixed ``t`` ``[B]`` and ``noise`` (no grad), for evaluation."""
    with torch.no_grad():
        x0 = x0.to(policy.device, torch.float32)
        noise = noise.to(policy.device, torch.float32)
        t = t.to(policy.device)
        v = policy.velocity(rf_interpolate(x0, noise, t), t, prompts)
        return (v - (noise - x0)).square().flatten(1).mean(1).cpu()
