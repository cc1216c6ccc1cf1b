"""The perception of the shapes world's learned understanding module: a small CNN that classifies one
object crop into a shape (circle / square / triangle / other) and a colour (red / green / blue / yellow).

It is trained in-run on crops of rendered shapes and random blobs (merged shapes, irregular polygons,
bars, half shapes, apex-down triangles) with blur / noise / colour-jitter augmentation, deterministic by
seed, and cached as safetensors in ``$SRUM_CACHE`` (default ``~/.cache/srum``). Its segmentation is its
own: foreground = pixels farther than ``FG_DIST`` from white, 4-connected components; each component
(other pixels whitened) is padded to a square and resized to 16x16. Nothing in it uses the evaluator's
colour palette fit or shape templates (:mod:`shapes.evaluator`), so a generator that fools one and not
the other shows up. :mod:`shapes.judge` turns what it sees into judge answers.
"""


from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shapes.world import BACKGROUND, COLORS, SHAPES, Spec, connected_components, shape_mask

__all__ = [
    "CROP", "FG_DIST", "PERCEPTION_CLASSES", "Percept", "ShapesPerception", "TrainSettings", "as_image_array",
    "components", "perception_accuracy",
]

PERCEPTION_CLASSES: tuple[str, ...] = (*SHAPES, "other")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
CROP = 16
FG_DIST = 80.0
PERCEPTION_VERSION = 1
_WHITE = np.array(BACKGROUND, dtype=np.float32)


# ----- segmentation and crops ----------------------------------------------------------------------


def as_image_array(image: Any) -> np.ndarray:
    """uint8 HxWx3 array from an array, tensor, PIL image or :class:`rewards.judge.PreparedImage`."""
    if hasattr(image, "pil"):
        image = image.pil
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


@dataclass(frozen=True)
class Component:
    """A foreground component: exclusive pixel box, centroid (x, y), area, mask in image coords."""

    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int
    mask: np.ndarray


def components(image: np.ndarray, min_area: int | None = None) -> list[Component]:
    """4-connected components of the pixels farther than :data:`FG_DIST` from white, largest first;
    components under ``min_area`` pixels (default ``max(4, 0.005 * H * W)``) are dropped."""
    arr = as_image_array(image)
    h, w = arr.shape[:2]
    min_area = max(4, int(round(0.005 * h * w))) if min_area is None else int(min_area)
    fg = np.linalg.norm(arr.astype(np.float32) - _WHITE, axis=-1) > FG_DIST
    labels, n = connected_components(fg, connectivity=4)
    out = []
    for k in range(1, n + 1):
        m = labels == k
        ys, xs = np.nonzero(m)
        if ys.size < min_area:
            continue
        out.append(Component((int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
                             (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5), int(ys.size), m))
    out.sort(key=lambda c: -c.area)
    return out


def crop_tensor(image: np.ndarray, mask: np.ndarray, crop: int = CROP) -> torch.Tensor:
    """[3, crop, crop] float in [0, 1]: the masked object on white, padded square (1 px margin), resized."""
    ys, xs = np.nonzero(mask)
    y1, y2, x1, x2 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    side = int(max(y2 - y1, x2 - x1)) + 2
    canvas = np.full((side, side, 3), 255, dtype=np.float32)
    oy, ox = (side - (y2 - y1)) // 2, (side - (x2 - x1)) // 2
    patch = np.where(mask[y1:y2, x1:x2, None], image[y1:y2, x1:x2].astype(np.float32), 255.0)
    canvas[oy:oy + (y2 - y1), ox:ox + (x2 - x1)] = patch
    t = torch.from_numpy(canvas).permute(2, 0, 1)[None] / 255.0
    return F.interpolate(t, size=(crop, crop), mode="bilinear", align_corners=False, antialias=True)[0]


# ----- the network ---------------------------------------------------------------------------


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread (restored after). This net is so small that thread
    hand-offs dominate: on the shared 2-core machine a training step took 33 ms with 1 thread and
    280 ms with 2, a 5-crop forward 1 ms vs 19 ms. Note: ``torch.set_num_threads`` is
    process-wide, so another thread running torch at the same moment is slowed meanwhile."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class PerceptionNet(nn.Module):
    """Conv net on a 16x16 crop with a shape head (4) and a colour head (4)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.shape_head = nn.Linear(64, len(PERCEPTION_CLASSES))
        self.color_head = nn.Linear(64, len(COLOR_NAMES))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.body(x * 2.0 - 1.0)
        return self.shape_head(z), self.color_head(z)


@dataclass(frozen=True)
class TrainSettings:
    """Training recipe of the perception net (part of the cache key)."""

    seed: int = 0
    n_train: int = 5000
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3
    size: int = 32

    def key(self) -> str:
        payload = {"version": PERCEPTION_VERSION, "crop": CROP, "fg": FG_DIST, "colors": COLORS,
                   **self.__dict__}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _blob_mask(rng: np.random.Generator, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """A random non-shape: merged pair, irregular polygon, bar, half shape, or apex-down triangle."""
    kind = int(rng.integers(5))
    if kind == 0:  # two shapes merged into one component
        ang = rng.uniform(0, 2 * math.pi)
        d = r * rng.uniform(0.9, 1.6)
        a = shape_mask(str(rng.choice(SHAPES)), cx, cy, r * 0.8, size)
        return a | shape_mask(str(rng.choice(SHAPES)), cx + d * math.cos(ang), cy + d * math.sin(ang), r * 0.8, size)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if kind == 1:  # irregular star-like polygon: radius varies strongly with the angle
        k = int(rng.integers(3, 6))
        phase = rng.uniform(0, 2 * math.pi)
        theta = np.arctan2(y - cy, x - cx)
        rad = r * (0.75 + 0.45 * np.cos(k * theta + phase))
        return np.hypot(x - cx, y - cy) <= rad
    if kind == 2:  # bar
        hw, hh = r * rng.uniform(1.2, 1.6), r * rng.uniform(0.25, 0.45)
        if rng.random() < 0.5:
            hw, hh = hh, hw
        return (np.abs(x - cx) <= hw) & (np.abs(y - cy) <= hh)
    if kind == 3:  # half of a shape
        m = shape_mask(str(rng.choice(SHAPES)), cx, cy, r * 1.2, size)
        side = int(rng.integers(4))
        cut = [x < cx, x > cx, y < cy, y > cy][side]
        return m & cut
    # apex-down triangle (only apex-up triangles exist in this world)
    half = (cy + r - y) / 2.0
    return (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= half)


def _training_set(s: TrainSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(crops [N, 3, 16, 16], shape labels [N], colour labels [N]) from rendered single objects."""
    rng = np.random.default_rng(s.seed)
    size = s.size
    xs, ys_shape, ys_color = [], [], []
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    while len(xs) < s.n_train:
        cls = int(rng.integers(len(PERCEPTION_CLASSES)))
        col = int(rng.integers(len(COLOR_NAMES)))
        r = float(rng.uniform(size / 10.0, size / 5.0))
        cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
        mask = shape_mask(SHAPES[cls], cx, cy, r, size) if cls < len(SHAPES) else _blob_mask(rng, cx, cy, r, size)
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = _WHITE
        img[mask] = np.clip(palette[col] + rng.uniform(-30, 30, size=3), 0, 255)
        if rng.random() < 0.5:  # 3x3 box blur
            p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
            img = sum(p[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)) / 9.0
        img = np.clip(img + rng.normal(0, rng.uniform(0, 15), img.shape), 0, 255).round().astype(np.uint8)
        fg = np.linalg.norm(img.astype(np.float32) - _WHITE, axis=-1) > FG_DIST  # one object: no labelling
        if fg.sum() < 4:
            continue
        xs.append(crop_tensor(img, fg))
        ys_shape.append(cls)
        ys_color.append(col)
    return torch.stack(xs), torch.tensor(ys_shape), torch.tensor(ys_color)


def cache_dir() -> Path:
    """``$SRUM_CACHE`` or ``~/.cache/srum``."""
    return Path(os.environ.get("SRUM_CACHE") or Path.home() / ".cache" / "srum")


# ----- perception ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Percept:
    """What the perception saw in one component."""

    shape: str
    color: str
    p_shape: float
    p_color: float
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int

    @property
    def confidence(self) -> float:
        return self.p_shape * self.p_color

    @property
    def label(self) -> str:
        if self.shape == "other":
            return f"an unrecognisable {self.color} blob"
        return f"a {self.color} {self.shape}"


class ShapesPerception:
    """Shape + colour classifier of object crops (module docstring)."""

    def __init__(self, net: PerceptionNet, settings: TrainSettings, train_seconds: float = 0.0):
        self.net = net.eval()
        self.settings = settings
        self.train_seconds = train_seconds

    @classmethod
    def train(cls, settings: TrainSettings | None = None) -> ShapesPerception:
        """Train from scratch (deterministic for a given ``settings.seed`` and thread count)."""
        s = settings or TrainSettings()
        t0 = time.perf_counter()
        x, ys, yc = _training_set(s)
        gen = torch.Generator().manual_seed(s.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            net = PerceptionNet()
        opt = torch.optim.Adam(net.parameters(), lr=s.lr)
        steps = s.epochs * math.ceil(len(x) / s.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=steps)
        net.train()
        with single_thread():
            cls._fit(net, opt, sched, x, ys, yc, s, gen)
        return cls(net.eval(), s, time.perf_counter() - t0)

    @staticmethod
    def _fit(net: PerceptionNet, opt: Any, sched: Any, x: torch.Tensor, ys: torch.Tensor, yc: torch.Tensor,
             s: TrainSettings, gen: torch.Generator) -> None:
        for _ in range(s.epochs):
            perm = torch.randperm(len(x), generator=gen)
            for i in range(0, len(x), s.batch_size):
                idx = perm[i:i + s.batch_size]
                ls, lc = net(x[idx])
                loss = F.cross_entropy(ls, ys[idx]) + F.cross_entropy(lc, yc[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()

    @classmethod
    def load_or_train(cls, settings: TrainSettings | None = None, directory: str | Path | None = None) -> ShapesPerception:
        """Load ``shapes_perception_<key>.safetensors`` from the cache dir, else train and save it."""
        from safetensors.torch import load_file, save_file

        s = settings or TrainSettings()
        d = Path(directory) if directory is not None else cache_dir()
        path = d / f"shapes_perception_{s.key()}.safetensors"
        if path.exists():
            net = PerceptionNet()
            net.load_state_dict(load_file(str(path)))
            return cls(net, s)
        perc = cls.train(s)
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        os.close(fd)
        save_file({k: v.contiguous() for k, v in perc.net.state_dict().items()}, tmp)
        os.replace(tmp, path)  # atomic: concurrent trainers write identical files
        return perc

    @torch.no_grad()
    def classify(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax probabilities (shape [N, 4], colour [N, 4]) of crops [N, 3, 16, 16]."""
        with single_thread():
            ls, lc = self.net(crops)
        return ls.softmax(-1), lc.softmax(-1)

    def perceive(self, image: Any) -> list[Percept]:
        """One :class:`Percept` per foreground component, largest first."""
        arr = as_image_array(image)
        comps = components(arr)
        if not comps:
            return []
        ps, pc = self.classify(torch.stack([crop_tensor(arr, c.mask) for c in comps]))
        out = []
        for c, s, k in zip(comps, ps, pc, strict=True):
            i, j = int(s.argmax()), int(k.argmax())
            out.append(Percept(PERCEPTION_CLASSES[i], COLOR_NAMES[j], float(s[i]), float(k[j]), c.box, c.centroid,
                               c.area))
        return out


def perception_accuracy(perc: ShapesPerception, specs: Sequence[Spec], seed: int = 123, size: int = 32,
                        blur: bool = False, noise: float = 0.0) -> float:
    """Object-level accuracy on fresh renders of ``specs``: matched (shape, colour) labels over the
    larger of the true and perceived object counts, summed over images."""
    from shapes.world import render

    rng = np.random.default_rng(seed)
    hit = tot = 0
    for spec in specs:
        img = render(spec, size, rng).astype(np.float32)
        if blur:
            p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
            img = sum(p[dy:dy + size, dx:dx + size] for dy in range(3) for dx in range(3)) / 9.0
        img = np.clip(img + rng.normal(0, noise, img.shape), 0, 255).round().astype(np.uint8)
        truth = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
        seen = [(p.shape, p.color) for p in perc.perceive(img)]
        rest = list(seen)
        for t in truth:
            if t in rest:
                rest.remove(t)
                hit += 1
        tot += max(len(truth), len(seen))
    return hit / max(tot, 1)
