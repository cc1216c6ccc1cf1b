"""The SRUM training loss and its rectified-flow pieces (DESIGN §4). Pure functions, no state.

Rectified flow as in SD3/FLUX: ``x_t = (1 - t) * x0 + t * eps`` with target velocity
``eps - x0`` (= d x_t / dt). Timesteps are logit-normal with SD3's shift. The loss is the
reward-weighted flow-matching MSE plus a constraint (reference) term:

    L_r   = mean(alpha * R * (v - (eps - x0))^2)
    L_ref = mean((v - (eps - x0))^2)
    L     = mean(max(alpha * R + lambda_c, weight_floor) * (v - (eps - x0))^2)

so ``L == L_r + lambda_c * L_ref`` whenever the floor is inactive: the constraint as the paper's Eq. 2
writes it (``learner.constraint: sample``). The KL reading (``reference``) holds the velocity to a frozen
reference policy's velocity ``v_ref`` at the same ``x_t`` instead (for two flow policies the KL is, up to a
weight per timestep, the squared distance between their velocities):

    L_ref = mean((v - v_ref)^2)
    L     = mean(max(alpha * R, weight_floor) * (v - (eps - x0))^2) + lambda_c * L_ref
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

__all__ = ["LossParts", "exact_fit_accuracy", "rf_interpolate", "rf_target", "sample_loss_weight", "sample_timesteps",
           "srum_loss"]

# Timesteps are kept in [_T_EPS, 1 - _T_EPS] so they are strictly inside (0, 1) in float32.
_T_EPS = 1e-6


class LossParts(NamedTuple):
    """``total`` carries the gradient; ``l_r`` and ``l_ref`` are detached float32 scalars for logging."""

    total: torch.Tensor
    l_r: torch.Tensor
    l_ref: torch.Tensor


def _per_sample(t: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` (float, scalar or [B]) as a tensor broadcastable against ``like`` [B, ...]."""
    t = torch.as_tensor(
        t, dtype=like.dtype if like.is_floating_point() else torch.float32, device=like.device
    )
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} must be a float, a scalar or shape [B]={[like.shape[0]]}, got shape {list(t.shape)}"
        )
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def rf_interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Point on the straight path: ``x_t = (1 - t) * x0 + t * noise``; ``t`` is a float or ``[B]``."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {list(x0.shape)} != noise shape {list(noise.shape)}")
    tb = _per_sample(t, x0, "t")
    return (1 - tb) * x0 + tb * noise


def rf_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity target ``noise - x0`` (the time derivative of :func:`rf_interpolate`)."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 shape {list(x0.shape)} != noise shape {list(noise.shape)}")
    return noise - x0


def sample_timesteps(
    n: int,
    *,
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw ``n`` training timesteps in (0, 1), float32, shape ``[n]``.

    ``u = sigmoid(logit_mean + logit_std * N(0, 1))`` (logit-normal), then SD3's shift
    ``t = shift * u / (1 + (shift - 1) * u)``; ``shift > 1`` moves mass towards t = 1 (noisier),
    ``shift = 1`` is the identity. Values are clamped to ``[1e-6, 1 - 1e-6]`` so that float32
    rounding never yields exactly 0 or 1. The noise is drawn on the generator's device (CPU when no
    generator is given) and moved to ``device``, so a seeded generator gives the same draw anywhere.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite positive number, got {shift!r}")
    if not (math.isfinite(logit_mean) and math.isfinite(logit_std) and logit_std >= 0):
        raise ValueError(
            f"logit_mean must be finite and logit_std finite and >= 0, got {logit_mean}, {logit_std}"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    z = torch.randn(int(n), generator=generator, device=gen_device, dtype=torch.float64)
    u = torch.sigmoid(logit_mean + logit_std * z)
    t = shift * u / (1 + (shift - 1) * u)
    t = t.clamp(_T_EPS, 1 - _T_EPS).to(torch.float32)
    return t.to(device) if device is not None else t


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def srum_loss(
    v_pred: torch.Tensor,
    noise: torch.Tensor,
    x0: torch.Tensor,
    weight_map: torch.Tensor,
    alpha: torch.Tensor | float,
    lambda_c: float = 0.5,
    weight_floor: float | None = 0.0,
    v_ref: torch.Tensor | None = None,
) -> LossParts:
    """SRUM loss for a batch: reward-weighted flow matching plus the reference constraint.

    Shapes: ``v_pred``, ``noise``, ``x0`` are ``[B, C, h, w]``; ``weight_map`` (the reward map ``R``
    on the latent grid) is ``[B, h, w]`` or ``[B, 1, h, w]`` and is broadcast over channels;
    ``alpha`` is a float, a scalar tensor or ``[B]``. With ``err = (v_pred - (noise - x0))^2`` the
    per-pixel total weight is ``w = alpha * R + lambda_c``, floored at ``weight_floor`` unless it is
    None, and ``total = mean(w * err)`` over all ``B*C*h*w`` elements; ``l_r = mean(alpha * R * err)``
    and ``l_ref = mean(err)`` are returned detached, for logging only (so ``total == l_r + lambda_c *
    l_ref`` when no pixel hits the floor). Per-sample means are equal-weighted because every sample
    has the same number of elements.

    Why the floor: in the ``signed`` semantics ``R`` reaches -1, so e.g. ``alpha = 1, R = -1,
    lambda_c = 0.5`` gives a per-pixel weight of -0.5. The loss then decreases without bound as the
    error on that pixel grows, and the optimiser would minimise it by driving the prediction to
    infinity. Flooring the weight at 0 (the default) keeps the loss >= 0: a strongly penalised pixel
    simply stops being pulled toward its own sample instead of being pushed away from it forever.
    ``weight_floor=None`` disables the floor (the paper's literal formula; unbounded below in
    signed mode). In the ``official`` semantics ``R >= 0`` so the floor never binds.

    ``v_ref`` (same shape as ``v_pred``, treated as a constant): the constraint reads ``lambda_c *
    mean((v_pred - v_ref)^2)`` (returned as ``l_ref``) and the floor applies to ``alpha * R`` alone.

    The computation runs in float32 with autocast disabled, whatever the input dtypes (bf16 inputs
    are cast; gradients still flow back to ``v_pred`` in its own dtype). ``weight_map`` and ``alpha``
    are treated as constants (detached). Raises ``ValueError`` on shape mismatches, naming the shapes.
    """
    if not (v_pred.shape == noise.shape == x0.shape) or v_pred.ndim != 4:
        raise ValueError(
            "v_pred, noise and x0 must share one [B, C, h, w] shape, got "
            f"{list(v_pred.shape)}, {list(noise.shape)}, {list(x0.shape)}"
        )
    B, _C, h, w = v_pred.shape
    R = weight_map.detach()
    if R.ndim == 3:
        R = R.unsqueeze(1)
    if R.ndim != 4 or R.shape[0] != B or R.shape[1] != 1 or tuple(R.shape[2:]) != (h, w):
        raise ValueError(
            f"weight_map shape {list(weight_map.shape)} does not match v_pred shape {list(v_pred.shape)}: "
            f"expected [{B}, {h}, {w}] or [{B}, 1, {h}, {w}]"
        )
    if not math.isfinite(lambda_c) or lambda_c < 0:
        raise ValueError(f"lambda_c must be finite and >= 0, got {lambda_c!r}")
    if weight_floor is not None and not math.isfinite(weight_floor):
        raise ValueError(f"weight_floor must be finite or None, got {weight_floor!r}")
    if v_ref is not None and v_ref.shape != v_pred.shape:
        raise ValueError(f"v_ref shape {list(v_ref.shape)} != v_pred shape {list(v_pred.shape)}")

    with _autocast_off(v_pred.device):
        v = v_pred.float()
        target = noise.detach().float() - x0.detach().float()
        R = R.to(device=v.device, dtype=torch.float32)
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.detach().to(device=v.device, dtype=torch.float32)
        a = _per_sample(alpha, v, "alpha")

        err = (v - target).square()
        reward_w = a * R  # [B, 1, h, w]
        total_w = reward_w + lambda_c if v_ref is None else reward_w
        if weight_floor is not None:
            total_w = total_w.clamp(min=weight_floor)
        total = (total_w * err).mean()
        if v_ref is not None:
            anchor = (v - v_ref.detach().float()).square().mean()
            total = total + lambda_c * anchor
        with torch.no_grad():
            l_r = (reward_w * err).mean()
            l_ref = err.mean() if v_ref is None else anchor
    return LossParts(total=total, l_r=l_r.detach(), l_ref=l_ref.detach())


# ------------------------------------------------------------------------- what exact fitting would give
def sample_loss_weight(alpha: float, mean_R: float, lambda_c: float, constraint: str = "sample",
                       weight_floor: float | None = 0.0) -> float:
    """Mean per-pixel weight of :func:`srum_loss` on one sample's own error: ``alpha * mean(R) + lambda_c``
    (constraint ``sample``) or ``alpha * mean(R)`` (``reference``: its constraint pulls toward the reference,
    not the sample), floored as the loss floors it. Exact when the floor binds nowhere or everywhere on the
    sample (always in the official semantics, where R >= 0)."""
    if constraint not in ("sample", "reference"):
        raise ValueError(f"constraint must be 'sample' or 'reference', got {constraint!r}")
    w = alpha * mean_R + (lambda_c if constraint == "sample" else 0.0)
    return max(w, weight_floor) if weight_floor is not None else w


def exact_fit_accuracy(correct: list[bool], weights: list[float]) -> float:
    """The accuracy a model that fitted a weighted pool exactly would have: each sample counts in
    proportion to its loss weight, ``sum(w_i * correct_i) / sum(w_i)``. The bound of one round of a
    reward-weighted regression (a pool at accuracy p with weight contrast k moves to kp / (kp + 1 - p))."""
    if len(correct) != len(weights) or not correct:
        raise ValueError(f"need as many weights as samples, at least one: got {len(correct)} and {len(weights)}")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    return sum(w for w, c in zip(weights, correct, strict=True) if c) / sum(weights)

