"""Per-pixel reward maps from judge scores (DESIGN §3).

Pure functions over small torch tensors; no I/O, no model calls. The scorer turns judge answers into
:class:`Region` objects plus a global-layout score and calls :func:`build_reward_map`; the learner
resizes the map to the latent grid with :func:`resize_map` and feeds ``alpha`` and ``R`` to the loss.

Two semantics (``reward.semantics``):

``official`` (the authors' released code)
    Every pixel starts at 0.5; a region with score ``s`` writes ``(s + 1) / 2`` into its box, merged
    with **max** against what is already there, *including the 0.5 background*. A pixel is therefore
    ``max(0.5, max_boxes (s + 1) / 2)``: a negative region score can never push a pixel below the
    background (it is a silent no-op, exactly as in the released code). ``alpha = (g + 1) / 2``; the
    sample is dropped when ``g`` is None (judge failed) or exactly 0 (the released code's fallback
    value). ``R * alpha`` equals the released code's map; keeping them apart lets the loss log both.
    The merge rule must be ``max`` (anything else raises: the released code has no other rule) and
    ``background`` is ignored (fixed at 0.5).

``signed`` (the paper's text)
    ``R`` in [-1, 1]. Pixels covered by no box hold ``reward.background`` (default 0.0); a covered
    pixel holds the merge of the scores of the boxes covering it: ``max``, ``min``, ``mean`` (plain
    mean of the covering scores; the background does not take part) or ``smallest`` (the box with the
    smallest clamped area wins; equal areas: the higher score wins, so the result does not depend on
    box order). ``alpha = (g + 1) / 2``; dropped only when ``g`` is None.

Box handling. Boxes are pixel ``[x1, y1, x2, y2]`` (floats allowed), clamped to ``[0, W] x [0, H]``.
Pixel ``(i, j)`` is the unit square ``[j, j+1) x [i, i+1)``; a box covers every pixel it overlaps
with positive area, i.e. columns ``floor(x1) .. ceil(x2) - 1`` and rows ``floor(y1) .. ceil(y2) - 1``.
Integer boxes therefore cover exactly the slice ``R[y1:y2, x1:x2]``. A box is skipped, and counted in
``skipped_boxes``, when it is malformed (not 4 numbers), has a NaN/inf coordinate, is inverted
(``x2 < x1`` or ``y2 < y1``, never silently swapped), has zero area after clamping (including boxes
wholly outside the image), or its score is None/NaN. Finite scores outside [-1, 1] are clamped.

Ablations (paper): ``granularity="sample"`` (one score for the whole image: ``R`` is constant,
``(s + 1) / 2`` in official mode and ``s`` in signed mode, from ``sample_score``, falling back to the
global score when ``sample_score`` is None; regions are ignored), ``binarize`` (``R := 1[R01 >
threshold]`` where ``R01`` is ``R`` in official mode and ``(R + 1) / 2`` in signed mode, so the result
is exactly {0, 1}) and ``use_global=False`` (``alpha = 1``; the global score never drops a sample, not
even when it is None or 0: the sample is still trained on from its region map. Judge failures are
the scorer's ``failed`` flag, not this module's business).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import get_args

import torch
import torch.nn.functional as F

from core.config import RewardConfig
from core.records import DropReason, Region

__all__ = ["OFFICIAL_BACKGROUND", "Region", "RewardMap", "build_reward_map", "global_to_alpha", "resize_map"]

#: Background value of the official semantics (fixed, not configurable).
OFFICIAL_BACKGROUND = 0.5
_RESIZE_MODES = get_args(RewardConfig.model_fields["resize"].annotation)


@dataclass(frozen=True)
class RewardMap:
    """Result of :func:`build_reward_map` at image resolution.

    ``R`` is ``[H, W]`` float32; ``alpha`` is the global factor (0.0 when the global score is
    missing); ``global_score`` is the clamped score actually used (None when missing or NaN).
    """

    R: torch.Tensor
    alpha: float
    drop: bool
    drop_reason: DropReason | None
    skipped_boxes: int
    global_score: float | None

    def weight(self) -> torch.Tensor:
        """The per-pixel reward weight ``alpha * R`` ([H, W] float32)."""
        return self.R * self.alpha


def global_to_alpha(g: float) -> float:
    """Normalise a global score in [-1, 1] to ``alpha = (g + 1) / 2``, clamped to [0, 1]."""
    if not math.isfinite(g):
        raise ValueError(f"global score must be finite, got {g!r}")
    return min(1.0, max(0.0, (g + 1.0) / 2.0))


def _finite_or_none(x: float | None) -> float | None:
    """``x`` as a float clamped to [-1, 1]; None when ``x`` is None or not finite."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return min(1.0, max(-1.0, x))


def _box_to_pixels(box: object, height: int, width: int) -> tuple[int, int, int, int, float] | None:
    """Clamp a box and return ``(r0, r1, c0, c1, area)`` (exclusive ends), or None to skip it."""
    try:
        x1, y1, x2, y2 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    if x2 < x1 or y2 < y1:
        return None
    x1, x2 = min(max(x1, 0.0), float(width)), min(max(x2, 0.0), float(width))
    y1, y2 = min(max(y1, 0.0), float(height)), min(max(y2, 0.0), float(height))
    area = (x2 - x1) * (y2 - y1)
    if area <= 0.0:
        return None
    return math.floor(y1), math.ceil(y2), math.floor(x1), math.ceil(x2), area


def _region_map_official(
    boxes: list[tuple[int, int, int, int, float, float]], height: int, width: int
) -> torch.Tensor:
    R = torch.full((height, width), OFFICIAL_BACKGROUND, dtype=torch.float32)
    for r0, r1, c0, c1, _area, s in boxes:
        patch = R[r0:r1, c0:c1]
        patch.clamp_(min=(s + 1.0) / 2.0)  # max(current, (s+1)/2), in place on the view
    return R


def _region_map_signed(
    boxes: list[tuple[int, int, int, int, float, float]],
    height: int,
    width: int,
    background: float,
    merge: str,
) -> torch.Tensor:
    shape = (height, width)
    covered = torch.zeros(shape, dtype=torch.bool)
    if merge == "mean":
        total = torch.zeros(shape, dtype=torch.float64)
        count = torch.zeros(shape, dtype=torch.float64)
        for r0, r1, c0, c1, _area, s in boxes:
            total[r0:r1, c0:c1] += s
            count[r0:r1, c0:c1] += 1.0
        covered = count > 0
        value = (total / count.clamp(min=1.0)).to(torch.float32)
    elif merge in ("max", "min"):
        init = -math.inf if merge == "max" else math.inf
        value = torch.full(shape, init, dtype=torch.float32)
        for r0, r1, c0, c1, _area, s in boxes:
            patch = value[r0:r1, c0:c1]
            if merge == "max":
                patch.clamp_(min=s)
            else:
                patch.clamp_(max=s)
            covered[r0:r1, c0:c1] = True
    else:  # smallest box wins; equal area -> higher score
        value = torch.zeros(shape, dtype=torch.float32)
        best_area = torch.full(shape, math.inf, dtype=torch.float64)
        for r0, r1, c0, c1, area, s in boxes:
            cur_a, cur_v = best_area[r0:r1, c0:c1], value[r0:r1, c0:c1]
            wins = (area < cur_a) | ((area == cur_a) & (s > cur_v))
            cur_a[wins] = area
            cur_v[wins] = s
            covered[r0:r1, c0:c1] = True
    return torch.where(covered, value, torch.tensor(background, dtype=torch.float32))


def build_reward_map(
    regions: Sequence[Region],
    global_score: float | None,
    height: int,
    width: int,
    cfg: RewardConfig,
    sample_score: float | None = None,
) -> RewardMap:
    """Build the per-pixel reward map of one sample (see the module docstring for the semantics).

    ``regions`` may be any objects with ``.box`` and ``.score``; ``global_score`` and ``sample_score``
    are judge scores in [-1, 1] (clamped; NaN is treated as None). Raises ``ValueError`` for bad sizes
    or settings; never for bad boxes or scores, which are skipped and counted.
    """
    if int(height) != height or int(width) != width or height < 1 or width < 1:
        raise ValueError(f"height and width must be positive integers, got {height!r} x {width!r}")
    height, width = int(height), int(width)
    official = cfg.semantics == "official"
    background = OFFICIAL_BACKGROUND if official else float(cfg.background)

    g = _finite_or_none(global_score)
    drop_reason: DropReason | None = None
    if cfg.use_global:
        alpha = 0.0 if g is None else global_to_alpha(g)
        if g is None:
            drop_reason = DropReason.NO_GLOBAL_SCORE
        elif official and g == 0.0:
            drop_reason = DropReason.GLOBAL_SCORE_ZERO
    else:
        alpha = 1.0

    skipped = 0
    if cfg.granularity == "sample":
        s = _finite_or_none(sample_score)
        if s is None:
            s = g
        if s is None:
            R = torch.full((height, width), background, dtype=torch.float32)
            drop_reason = drop_reason or DropReason.NO_SAMPLE_SCORE
        else:
            R = torch.full((height, width), (s + 1.0) / 2.0 if official else s, dtype=torch.float32)
    else:
        boxes: list[tuple[int, int, int, int, float, float]] = []
        for region in regions:
            s = _finite_or_none(getattr(region, "score", None))
            px = _box_to_pixels(getattr(region, "box", None), height, width)
            if s is None or px is None:
                skipped += 1
                continue
            boxes.append((*px, s))
        if official:
            R = _region_map_official(boxes, height, width)
        else:
            R = _region_map_signed(boxes, height, width, background, cfg.merge)

    if cfg.binarize:
        r01 = R if official else (R + 1.0) / 2.0
        R = (r01 > cfg.binarize_threshold).to(torch.float32)

    return RewardMap(
        R=R,
        alpha=alpha,
        drop=drop_reason is not None,
        drop_reason=drop_reason,
        skipped_boxes=skipped,
        global_score=g,
    )


def resize_map(R: torch.Tensor, h: int, w: int, mode: str = "area") -> torch.Tensor:
    """Resize a reward map ``[H, W]`` (or a batch ``[B, H, W]``) to ``[h, w]`` (``[B, h, w]``).

    ``area`` averages over the source pixels each target pixel covers (``F.interpolate(mode="area")``,
    i.e. adaptive average pooling), so the mean is preserved exactly when ``H, W`` are multiples of
    ``h, w``. ``bilinear`` uses ``align_corners=False`` with antialiasing when downsampling; both
    modes are convex combinations, so the output stays within the input's range. Returns float32.
    """
    if mode not in _RESIZE_MODES:
        raise ValueError(f"resize mode {mode!r}: allowed {_RESIZE_MODES}")
    if R.ndim not in (2, 3):
        raise ValueError(f"reward map must be [H, W] or [B, H, W], got shape {tuple(R.shape)}")
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"target size must be positive integers, got {h!r} x {w!r}")
    h, w = int(h), int(w)
    x = R.to(torch.float32)
    batched = x.ndim == 3
    x = x.unsqueeze(1) if batched else x[None, None]
    H, W = x.shape[-2:]
    if (H, W) == (h, w):
        out = x.clone()
    elif mode == "area":
        out = F.interpolate(x, size=(h, w), mode="area")
    else:
        downsampling = h < H or w < W
        out = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=downsampling)
    return out[:, 0] if batched else out[0, 0]
