"""The SRUM learner: one reward-weighted flow-matching step per call (DESIGN §4).

A plain class (``cluster/`` makes it a Ray actor). Per :meth:`Learner.train_step`:

1. prompts -> cached frozen text conditioning (:meth:`Policy.encode`);
2. ``t ~ sample_timesteps`` (logit-normal with SD3's shift) and ``noise ~ N(0, I)``, both drawn from
   the learner's own seeded CPU generator (reproducible on any device, restored on resume);
3. ``x_t = (1 - t) x0 + t noise``; ``v = policy.velocity(x_t, t)`` (bf16 autocast on CUDA when
   ``mixed_precision`` is "auto"/"bf16");
4. ``srum_loss`` with each sample's reward map ``R`` and global weight ``alpha``; with
   ``learner.constraint: reference`` the constraint holds ``v`` to the frozen base's velocity at the same
   ``x_t`` (one no-grad forward with the base's trainable tensors swapped in) instead of the sample's target;
5. backward, grad-norm clip, AdamW (linear warm-up then constant LR), optional EMA (with a warm-up of its
   decay, :func:`ema_decay_at`).

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
import random
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from core.config import LearnerConfig, PolicyConfig, SRUMConfig
from core.config_io import config_hash
from core.records import TrainBatch
from learner.base import Policy
from learner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from learner.loss import rf_interpolate, sample_timesteps, srum_loss


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


def ema_decay_at(step: int, decay: float, warmup_steps: int) -> float:
    """EMA decay of the update after ``step`` applied steps: ``min(decay, (1 + step) / (warmup_steps + step))``
    (0.1, 0.18, 0.25, ... for warmup_steps=10), so the EMA follows the weights early instead of staying at the
    base for ~1/(1 - decay) steps; ``warmup_steps`` <= 1 gives the constant ``decay``."""
    if warmup_steps <= 1:
        return decay
    return min(decay, (1.0 + step) / (warmup_steps + step))


def training_hash(policy_cfg: PolicyConfig, learner_cfg: LearnerConfig) -> str:
    """sha256 over the fields that change the optimisation (each section's ``TRAINING_FIELDS``)."""
    data = {name: {k: section.model_dump(mode="json")[k] for k in section.TRAINING_FIELDS}
            for name, section in (("policy", policy_cfg), ("learner", learner_cfg))}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class Learner:
    """SRUM learner over a :class:`~learner.base.Policy` (see module docstring).

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
        # constraint 'reference': the frozen base's trainable tensors, taken here, before any resume (LoRA: the
        # adapter's initial state, whose output is zero, so only the adapter's size is held twice)
        self.reference: list[torch.Tensor] | None = (
            [p.detach().clone() for p in self.params] if c.constraint == "reference" else None)
        mp = c.mixed_precision
        use_bf16 = mp == "bf16" or (mp == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        self.step = 0
        self.skipped_steps = 0
        self.resumed_service: dict[str, Any] | None = None  # service data of the checkpoint resumed from

    # -------------------------------------------------------------------------------- training
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self, b: TrainBatch) -> dict[str, float]:
        """One SRUM step on ``b`` (prompts, x0, R, alpha); returns metrics:
        loss, l_r, l_ref, grad_norm, lr, step_time_s, samples, skipped, step, version."""
        t0 = time.perf_counter()
        n, dev, c = len(b.prompts), self.device, self.cfg
        x0 = b.x0.to(dev, torch.float32)
        cond = self.policy.encode(b.prompts)
        t = sample_timesteps(n, shift=c.timestep_shift, logit_mean=c.logit_mean, logit_std=c.logit_std,
                             generator=self.generator).to(dev)
        noise = torch.randn(x0.shape, generator=self.generator, dtype=torch.float32).to(dev)
        x_t = rf_interpolate(x0, noise, t)
        v_ref = self._reference_velocity(x_t, t, cond) if self.reference is not None else None
        with self._autocast():
            v = self.policy.velocity(x_t, t, cond=cond)
        parts = srum_loss(v, noise, x0, b.R.to(dev), b.alpha.to(dev), lambda_c=c.lambda_c,
                          weight_floor=c.weight_floor, v_ref=v_ref)
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
                                         1.0 - ema_decay_at(self.step, float(c.ema_decay), c.ema_warmup_steps))
            self.step += 1
            self.policy.version += 1
        self.optimizer.zero_grad(set_to_none=True)
        return {
            "loss": loss, "l_r": l_r, "l_ref": l_ref, "grad_norm": gnorm, "lr": lr,
            "step_time_s": time.perf_counter() - t0, "samples": float(n), "skipped": float(skipped),
            "step": float(self.step), "version": float(self.policy.version),
        }

    @torch.no_grad()
    def _reference_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The frozen reference's velocity at ``(x_t, t)``: the trainable tensors are swapped for the base's
        for one no-grad forward, then put back (same storage, nothing copied)."""
        current = [p.data for p in self.params]
        try:
            for p, r in zip(self.params, self.reference, strict=True):
                p.data = r
            with self._autocast():
                return self.policy.velocity(x_t, t, cond=cond).detach()
        finally:
            for p, d in zip(self.params, current, strict=True):
                p.data = d

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

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything an exact resume needs, as plain containers and CPU tensors (see
        :mod:`learner.checkpoint` for how it is written)."""
        version, trainable = self.policy.trainable_state()
        return {
            "meta": {"step": self.step, "version": version, "skipped_steps": self.skipped_steps, "seed": self.seed,
                     "config_hash": self.config_hash, "training_hash": self.training_hash,
                     "param_names": list(self.param_names)},
            "trainable": trainable,
            "ema": self.ema_state(),
            "optimizer": {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
            "rng": self._rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any], *, allow_config_change: bool = False,
                        source: str = "checkpoint") -> None:
        """Restore weights, EMA, optimiser, scheduler, counters and RNG from :meth:`state_dict`'s output.

        A different training hash is a :class:`CheckpointError` unless ``allow_config_change`` (then a
        warning); any other config difference warns. ``source`` names the state in messages."""
        meta = state["meta"]
        if meta.get("training_hash") != self.training_hash:
            msg = f"{source}: the training config (policy/learner fields that change the optimisation) differs " \
                  "from the checkpoint's"
            if not allow_config_change:
                raise CheckpointError(msg + "; pass allow_config_change=True to resume anyway")
            warnings.warn(msg, stacklevel=2)
        elif meta.get("config_hash") != self.config_hash:
            warnings.warn(f"{source}: config differs from the checkpoint's outside the training fields "
                          "(e.g. run budget, judge, cluster); resuming", stacklevel=2)
        if meta.get("param_names") != self.param_names:
            raise CheckpointError(f"{source}: trainable parameter names differ from this learner's "
                                  "(e.g. LoRA vs full fine-tuning, or another rank/targets)")
        if state.get("ema") is None and self.ema is not None:
            raise CheckpointError(f"{source}: checkpoint has no EMA but this learner keeps one")
        try:
            self.policy.load_trainable_state(state["trainable"], int(meta["version"]))
            self.optimizer.load_state_dict(state["optimizer"]["optimizer"])
            self.scheduler.load_state_dict(state["optimizer"]["scheduler"])
            if state.get("ema") is not None and self.ema is not None:
                self.load_ema_state(state["ema"])
            self._set_rng_state(state["rng"])
            self.step = int(meta["step"])
            self.skipped_steps = int(meta.get("skipped_steps", 0))
        except (ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"{source} does not fit this learner: {exc}") from exc

    def checkpoint(self, root: str | Path, service: Mapping[str, Any] | None = None) -> Path:
        """Save :meth:`state_dict` under ``root`` (see :mod:`learner.checkpoint`), keeping the newest
        ``learner.keep_checkpoints``; ``service`` (JSON data, e.g. the driver's data cursor) is stored with
        it. Returns the step dir."""
        state = self.state_dict()
        if service is not None:
            state["meta"]["service"] = dict(service)
        return save_checkpoint(root, state, keep=self.cfg.keep_checkpoints)

    def resume(self, root: str | Path, allow_config_change: bool = False, verify: bool = True) -> Path:
        """Restore the latest complete checkpoint under ``root`` (or a step dir); returns the step dir (its
        stored service data: :attr:`resumed_service`)."""
        state, step_dir = load_checkpoint(root, verify=verify)
        self.load_state_dict(state, allow_config_change=allow_config_change, source=str(step_dir))
        self.resumed_service = state["meta"].get("service")
        return step_dir

    def _rng_state(self) -> dict[str, Any]:
        """All RNG states as tensors and plain numbers (loadable with ``weights_only=True``)."""
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        py_version, py_state, py_gauss = random.getstate()
        return {
            "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "learner_generator": self.generator.get_state(),
            "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
            "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                       "gauss_next": py_gauss},
        }

    def _set_rng_state(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch_cpu"])
        if state["torch_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["torch_cuda"])
        self.generator.set_state(state["learner_generator"])
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        p = state["python"]
        random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss_next"]))


def eval_flow_loss(policy: Policy, x0: torch.Tensor, prompts: Sequence[str], t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching MSE at fixed ``t`` ``[B]`` and ``noise`` (no grad), for evaluation."""
    with torch.no_grad():
        x0 = x0.to(policy.device, torch.float32)
        noise = noise.to(policy.device, torch.float32)
        t = t.to(policy.device)
        v = policy.velocity(rf_interpolate(x0, noise, t), t, prompts)
        return (v - (noise - x0)).square().flatten(1).mean(1).cpu()
