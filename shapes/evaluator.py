"""Exact geometric evaluator of the shapes world, independent of the reward path (nothing learned).

Pipeline of :func:`detect`:

1. every pixel takes the nearest colour (Euclidean RGB) of the palette plus the white background;
   a pixel farther than ``max_color_dist`` from every palette colour is "unknown" and ignored;
2. 4-connected components per colour (:func:`shapes.world.connected_components`); components
   smaller than ``min_area`` pixels (default ``max(4, 0.005 * H * W)``) are dropped;
3. shape from geometric features of the component: fill ratio of its bounding box (square ~1,
   circle ~0.785, triangle ~0.5), the bottom/top mass ratio about the box's middle row (an upright
   triangle keeps ~3x more pixels in its lower half; circles and squares ~1) and the aspect ratio.
   Anything that fits none of the prototypes is ``"other"`` (merged or broken blobs).

:func:`check` compares detections with a :class:`shapes.world.Spec`: the count of every mentioned
(shape, colour) must be exact, and for spatial specs the relation must hold between the centroids
(:func:`shapes.world.relation_holds`, margin ``size / 8``). Objects the prompt does not mention
are allowed (GenEval's convention).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shapes.world import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    SHAPES,
    Spec,
    connected_components,
    make_split,
    prompt_of,
    relation_holds,
    shape_mask,
)

__all__ = ["Detection", "HeldoutEvaluator", "accuracy", "check", "classify_shape", "detect", "eval_specs",
           "pixel_colors"]

_PALETTE_NAMES: tuple[str, ...] = ("background", *COLORS)
_WHITE = np.array(BACKGROUND, dtype=np.float32)
_DIRS = np.array(list(COLORS.values()), dtype=np.float32) - _WHITE  # [K, 3] colour - background
_DIR_SQ = (_DIRS**2).sum(-1)


@dataclass(frozen=True)
class Detection:
    """One detected object: shape (``"other"`` when unrecognised), colour, exclusive pixel box,
    centroid (x, y) in pixel-centre coordinates, and area in pixels."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int


def pixel_colors(image: np.ndarray, min_coverage: float = 0.4, max_residual: float = 55.0) -> np.ndarray:
    """[H, W] int map: 0 = background, k = k-th colour of ``COLORS`` (1-based), -1 = unknown.

    A pixel is read as a mix ``white + t * (colour - white)`` of the background and each palette
    colour (``t`` = coverage, clipped to [0, 1.5]); it belongs to the colour with the smallest
    residual among those with ``t >= min_coverage`` (0.4: a 3x3-blurred edge keeps its
    corner pixels, 4/9 covered, and sheds the outside ring, 3/9), is background when no colour
    reaches that coverage, and unknown when the best residual exceeds ``max_residual``.
    """
    arr = _check_image(image).astype(np.float32)
    p = arr - _WHITE
    t = np.clip(np.einsum("hwc,kc->hwk", p, _DIRS) / _DIR_SQ, 0.0, 1.5)
    resid = np.linalg.norm(p[:, :, None, :] - t[..., None] * _DIRS, axis=-1)
    resid = np.where(t >= min_coverage, resid, np.inf)
    best = resid.argmin(-1)
    best_r = resid.min(-1)
    out = np.where(np.isinf(best_r), 0, np.where(best_r > max_residual, -1, best + 1))
    return out.astype(np.int64)


def template_ious(mask: np.ndarray) -> dict[str, float]:
    """IoU of a component (boolean mask in image coordinates) with each shape's template of the same
    area and centroid (module docstring)."""
    ys, xs = np.nonzero(mask)
    area = float(ys.size)
    mx, my = float(xs.mean()) + 0.5, float(ys.mean()) + 0.5
    h, w = mask.shape
    out = {}
    for shape in SHAPES:
        if shape == "circle":
            r, cy = math.sqrt(area / math.pi), my
        elif shape == "square":
            r, cy = math.sqrt(area) / 2.0, my
        else:  # apex-up triangle of half-extent r: area 2 r^2, centroid r / 3 below the box centre
            r = math.sqrt(area / 2.0)
            cy = my - r / 3.0
        t = shape_mask(shape, mx, cy, r, max(h, w))[:h, :w]
        inter = float(np.logical_and(t, mask).sum())
        out[shape] = inter / (area + float(t.sum()) - inter)
    return out


def vertical_skew(mask: np.ndarray) -> float:
    """Skewness of the rows of a component's pixels (y down): about -0.57 for an apex-up triangle,
    0 for circles and squares."""
    ys = np.nonzero(mask)[0].astype(np.float64)
    sd = ys.std()
    return float(((ys - ys.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0


def classify_shape(mask: np.ndarray, min_iou: float = 0.6, triangle_skew: float = -0.3) -> str:
    """Shape of a component (boolean mask in image coordinates): a triangle when its rows are skewed
    like an apex-up triangle's, else the better of the circle and square templates; ``"other"``
    when the chosen template's IoU is under ``min_iou``."""
    ious = template_ious(mask)
    best = "triangle" if vertical_skew(mask) <= triangle_skew else max(("circle", "square"), key=ious.__getitem__)
    return best if ious[best] >= min_iou else "other"


def detect(image: np.ndarray, min_area: int | None = None) -> list[Detection]:
    """Detections of ``image`` (uint8 HxWx3), largest first (module docstring)."""
    arr = _check_image(image)
    h, w = arr.shape[:2]
    min_area = max(4, int(round(0.005 * h * w))) if min_area is None else int(min_area)
    cmap = pixel_colors(arr)
    out: list[Detection] = []
    for k, name in enumerate(_PALETTE_NAMES[1:], start=1):
        mask = cmap == k
        if mask.sum() < min_area:
            continue
        labels, n = connected_components(mask, connectivity=4)
        for lab in range(1, n + 1):
            ys, xs = np.nonzero(labels == lab)
            if ys.size < min_area:
                continue
            y1, y2, x1, x2 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
            out.append(Detection(classify_shape(labels == lab), name, (x1, y1, x2, y2),
                                 (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), int(ys.size)))
    out.sort(key=lambda d: -d.area)
    return out


def check(image: np.ndarray, spec: Spec, detections: Sequence[Detection] | None = None) -> dict[str, Any]:
    """Compare ``image`` with ``spec``.

    Returns ``{"correct", "counts_ok", "missing", "counts": {"shape color": (found, wanted)},
    "relation_ok" (None without a relation), "category", "n_detections"}``.
    """
    arr = _check_image(image)
    dets = list(detect(arr) if detections is None else detections)
    counts = {}
    for o in spec.objects:
        found = sum(d.shape == o.shape and d.color == o.color for d in dets)
        counts[f"{o.color} {o.shape}"] = (found, o.count)
    counts_ok = all(f == want for f, want in counts.values())
    missing = [k for k, (f, _) in counts.items() if f == 0]
    relation_ok = None
    if spec.relation is not None:
        i, rel, j = spec.relation
        a, b = spec.objects[i], spec.objects[j]
        da = [d for d in dets if (d.shape, d.color) == a.kind]
        db = [d for d in dets if (d.shape, d.color) == b.kind]
        relation_ok = bool(len(da) == 1 and len(db) == 1
                           and relation_holds(rel, da[0].centroid, db[0].centroid, arr.shape[1] / 8.0))
    correct = counts_ok and relation_ok is not False
    return {"correct": bool(correct), "counts_ok": bool(counts_ok), "missing": missing, "counts": counts,
            "relation_ok": relation_ok, "category": spec.category, "n_detections": len(dets)}


def accuracy(images: Sequence[np.ndarray], specs: Sequence[Spec]) -> dict[str, float]:
    """Fraction correct: ``{"overall": x, "<category>": x, ...}`` (only categories present, plus
    ``"n"`` the number of images)."""
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images but {len(specs)} specs")
    if not specs:
        raise ValueError("accuracy of an empty set")
    ok = [check(im, sp)["correct"] for im, sp in zip(images, specs, strict=True)]
    out = {"overall": float(np.mean(ok)), "n": float(len(ok))}
    for cat in CATEGORIES:
        sel = [c for c, sp in zip(ok, specs, strict=True) if sp.category == cat]
        if sel:
            out[cat] = float(np.mean(sel))
    return out


def _check_image(image: Any) -> np.ndarray:
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
    return arr


def eval_specs(specs: Sequence[Spec], seeds_per_prompt: int = 1, min_per_category: int = 0) -> list[Spec]:
    """Each spec repeated for its images: ``seeds_per_prompt`` times, or more in a category with few prompts so
    that every category gets at least ``min_per_category`` images (a category of 4 prompts and a minimum of 100
    takes 25 images of each). With a minimum of 100, one image is at most 1 point of a category."""
    if seeds_per_prompt < 1 or min_per_category < 0:
        raise ValueError(f"need seeds_per_prompt >= 1 and min_per_category >= 0, got {seeds_per_prompt}, "
                         f"{min_per_category}")
    n_cat = {c: sum(s.category == c for s in specs) for c in CATEGORIES}
    return [s for s in specs for _ in range(max(seeds_per_prompt, math.ceil(min_per_category / n_cat[s.category])))]


class HeldoutEvaluator:
    """:func:`accuracy` of a policy's samples on the world's held-out prompts (the split of ``split_seed``),
    ``seeds_per_prompt`` images each (at least ``min_per_category`` images per category: :func:`eval_specs`)
    with seeds ``seed, seed + 1, ...``, sampled with CFG ``guidance`` (None = the policy's own) in chunks of
    ``batch_size``."""

    def __init__(self, split_seed: int = 0, seeds_per_prompt: int = 2, guidance: float | None = None,
                 seed: int = 10_000, batch_size: int = 66, min_per_category: int = 0):
        _, held = make_split(split_seed)
        self.specs = eval_specs(held, seeds_per_prompt, min_per_category)
        self.prompts = [prompt_of(s) for s in self.specs]
        self.seeds = list(range(seed, seed + len(self.specs)))
        self.guidance, self.batch_size = guidance, batch_size

    def evaluate(self, policy: Any) -> dict[str, float]:
        images = []
        for i in range(0, len(self.specs), self.batch_size):
            batch = policy.sample(self.prompts[i:i + self.batch_size], self.seeds[i:i + self.batch_size],
                                  guidance=self.guidance)
            images += list(batch.images.numpy())
        return accuracy(images, self.specs)
