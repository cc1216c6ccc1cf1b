"""The learned understanding module of the shapes world, behind srum's judge and proposer interfaces.

* :class:`ShapesPerception` -- a small CNN that classifies one object crop into a shape
  (circle / square / triangle / other) and a colour (red / green / blue / yellow). It is trained
  in-run on crops of rendered shapes and random blobs (merged shapes, irregular polygons, bars,
  half shapes, apex-down triangles) with blur / noise / colour-jitter augmentation, deterministic
  by seed, and cached as safetensors in ``$SRUM_CACHE`` (default ``~/.cache/srum``). Its
  segmentation is its own: foreground = pixels farther than ``FG_DIST`` from white, 4-connected
  components; each component (other pixels whitened) is padded to a square and resized to 16x16.
  Nothing in it uses the evaluator's colour palette fit or shape templates
  (:mod:`shapes.evaluator`), so a generator that fools one and not the other shows up.
* :class:`ComponentsProposer` -- a region proposer (same interface as :mod:`rewards.regions`):
  the boxes of the foreground components, top-k by area.
* :class:`ShapesJudge` -- a :class:`rewards.judge.BaseJudge` backend that reads srum's own judge
  requests (:mod:`rewards.prompts`): the kind of request from its first line, the user prompt from
  the JSON literal on the ``Prompt the image was generated from:`` line and the region boxes from
  the ``Region ID: k, box [...]`` lines. It answers in the judge protocol, so the standard parsers
  read it: text (``Score:`` / ``Reason:``), structured JSON (tenths), or -- in logprob mode -- a
  next-character distribution whose expectation is exactly its score.

Scoring rules (the paper's guide, made concrete; ``c`` = the perception's confidence, the product
of the shape and colour probabilities, minimum over the objects involved):

* global layout, spatial prompt: both objects found once and the relation holds -> 0.8 + 0.2c;
  the reverse relation holds -> -(0.7 + 0.3c); neither -> -0.5. One object missing -> -0.6, both
  -> -0.9. Each count violation (an object found more than once) -0.3, each unrequested
  recognisable object -0.1 (at most 2); clamped to [-1, 1].
* global layout, prompt without spatial intent (single / counting / colour binding): the neutral
  band of the guide, graded on presence and counts: 0.4 when every mentioned object is present
  with its exact count, -0.5 for each object missing or miscounted, -0.1 per unrequested
  recognisable object (at most 2); floored at -0.8 (it never reaches exactly 0, which would drop
  the sample under the official semantics).
* region: the component under the box (largest overlap) -- matching a prompt object -> 0.9c
  (0.3c when more of that object were found than asked for); a recognisable object that is not in
  the prompt (wrong colour, wrong shape, unrelated) -> -0.6; an unrecognisable blob -> -0.8; a box
  with no foreground -> 0.0 (background).
* sample-level: 0.9c when the image satisfies the prompt (counts and relation) by perception,
  else 0.9 - 0.6 per missing/miscounted object, -0.8 for a contradicted relation, floored at -1.
* a prompt outside the shapes grammar: 0.0 with a reason saying so (dropped by the official map).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
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

from rewards import prompts as Q
from rewards.judge import BaseJudge, Completion, PreparedImage
from rewards.regions import Proposal, RegionProposer
from shapes.world import (
    BACKGROUND,
    COLORS,
    OPPOSITE,
    SHAPES,
    Spec,
    connected_components,
    parse_prompt,
    relation_holds,
    shape_mask,
)

__all__ = [
    "CROP", "FG_DIST", "PERCEPTION_CLASSES", "ComponentsProposer", "Percept", "ShapesJudge", "ShapesPerception",
    "TrainSettings", "components", "perception_accuracy",
]

PERCEPTION_CLASSES: tuple[str, ...] = (*SHAPES, "other")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
CROP = 16
FG_DIST = 80.0
PERCEPTION_VERSION = 1
_WHITE = np.array(BACKGROUND, dtype=np.float32)


# ----- segmentation and crops ----------------------------------------------------------------------


def _as_array(image: Any) -> np.ndarray:
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
    arr = _as_array(image)
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
        arr = _as_array(image)
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


# ----- proposer --------------------------------------------------------------------------------


class ComponentsProposer(RegionProposer):
    """Boxes of the foreground components (:func:`components`), padded by ``pad`` pixels, then the
    standard selection (min area, top-k by component area, IoU de-duplication)."""

    def __init__(self, cfg: Any, pad: int = 1):
        super().__init__(cfg)
        self.pad = int(pad)

    def propose_sync(self, image: Any) -> list[Proposal]:
        arr = _as_array(image)
        h, w = arr.shape[:2]
        p = self.pad
        cands = [Proposal(box=(float(max(0, c.box[0] - p)), float(max(0, c.box[1] - p)),
                               float(min(w, c.box[2] + p)), float(min(h, c.box[3] + p))), area=float(c.area))
                 for c in components(arr)]
        return self._select(cands, w, h)

    async def apropose(self, image: Any, prompt: str) -> list[Proposal]:
        return self.propose_sync(image)


# ----- judge ---------------------------------------------------------------------------------

_HEADERS = {name: tpl.split("\n", 1)[0] for name, tpl in (
    ("global", Q.GLOBAL_LAYOUT_TEMPLATE), ("regions", Q.REGION_TEMPLATE), ("sample", Q.SAMPLE_LEVEL_TEMPLATE),
    ("grounding", Q.GROUNDING_TEMPLATE))}
_REGION_LINE = re.compile(r"^Region ID: (\d+), box \[(-?\d+), (-?\d+), (-?\d+), (-?\d+)\]$", re.M)
_PREFIX_REGION = re.compile(r"Region ID: (\d+)")


def request_kind(text: str) -> str | None:
    """'global' / 'regions' / 'sample' / 'grounding' from the request's first line, else None."""
    first = text.split("\n", 1)[0]
    return next((k for k, h in _HEADERS.items() if first == h), None)


def request_prompt(text: str) -> str | None:
    """The user prompt embedded (as a JSON string literal) in a request of :mod:`rewards.prompts`."""
    for line in text.split("\n"):
        if line.startswith(Q.PROMPT_LINE_PREFIX):
            try:
                value = json.loads(line[len(Q.PROMPT_LINE_PREFIX):])
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, str) else None
    return None


def request_boxes(text: str) -> dict[int, tuple[int, int, int, int]]:
    """``{region id: box}`` from the request's ``Region ID: k, box [x1, y1, x2, y2]`` lines."""
    return {int(m[1]): (int(m[2]), int(m[3]), int(m[4]), int(m[5])) for m in _REGION_LINE.finditer(text)}


def _fmt(score: float) -> str:
    return f"{max(-1.0, min(1.0, score)):.2f}"


@dataclass(frozen=True)
class Verdict:
    """A score with its reason (and, for regions, the identified object)."""

    score: float
    reason: str
    obj: str = ""


def _matches(spec: Spec, percepts: Sequence[Percept]) -> tuple[dict[int, list[Percept]], list[Percept]]:
    """Percepts matching each spec object by (shape, colour), and the recognisable unrequested rest."""
    by_obj = {i: [p for p in percepts if (p.shape, p.color) == o.kind] for i, o in enumerate(spec.objects)}
    kinds = {o.kind for o in spec.objects}
    extra = [p for p in percepts if p.shape != "other" and (p.shape, p.color) not in kinds]
    return by_obj, extra


def global_verdict(spec: Spec, percepts: Sequence[Percept], size: int) -> Verdict:
    """Global-layout score (module docstring)."""
    by_obj, extra = _matches(spec, percepts)
    names = [f"{o.color} {o.shape}" for o in spec.objects]
    n_extra = min(len(extra), 2)
    bad_counts = [names[i] for i, o in enumerate(spec.objects) if by_obj[i] and len(by_obj[i]) != o.count]
    missing = [names[i] for i in by_obj if not by_obj[i]]
    note = (f" Also {len(extra)} object(s) the prompt does not mention." if extra else "")
    if spec.relation is None:
        wrong = len(missing) + sum(len(by_obj[i]) != o.count for i, o in enumerate(spec.objects) if by_obj[i])
        if wrong == 0:
            return Verdict(max(-0.8, 0.4 - 0.1 * n_extra),
                           "The prompt asks for no particular arrangement; every requested object is present "
                           "with the right count." + note)
        what = ([f"missing {m}" for m in missing] + [f"wrong number of {b}" for b in bad_counts])
        return Verdict(max(-0.8, 0.4 - 0.5 * wrong - 0.1 * n_extra),
                       "No arrangement is requested, but " + ", ".join(what) + "." + note)
    i, rel, j = spec.relation
    if len(missing) == 2:
        return Verdict(-0.9, f"Neither the {names[i]} nor the {names[j]} is visible, so the layout fails.")
    if missing:
        return Verdict(max(-1.0, -0.6 - 0.1 * n_extra), f"The {missing[0]} is missing, so it cannot be {rel} the other object.")
    a = max(by_obj[i], key=lambda p: p.confidence)
    b = max(by_obj[j], key=lambda p: p.confidence)
    c = min(a.confidence, b.confidence)
    margin = size / 8.0
    if relation_holds(rel, a.centroid, b.centroid, margin):
        score, why = 0.8 + 0.2 * c, f"The {names[i]} is {rel} the {names[j]}, as asked."
    elif relation_holds(OPPOSITE[rel], a.centroid, b.centroid, margin):
        score, why = -(0.7 + 0.3 * c), f"The {names[i]} is {OPPOSITE[rel]} the {names[j]}: the reverse of the prompt."
    else:
        score, why = -0.5, f"The {names[i]} is not clearly {rel} the {names[j]}."
    if bad_counts:
        why += " Wrong number of " + ", ".join(bad_counts) + "."
    return Verdict(max(-1.0, min(1.0, score - 0.3 * len(bad_counts) - 0.1 * n_extra)), why + note)


def sample_verdict(spec: Spec, percepts: Sequence[Percept], size: int) -> Verdict:
    """Sample-level (whole image) score (module docstring)."""
    by_obj, _ = _matches(spec, percepts)
    wrong = sum(len(by_obj[i]) != o.count for i, o in enumerate(spec.objects))
    rel_bad = False
    if spec.relation is not None and all(by_obj[k] for k in (0, 1)):
        i, rel, j = spec.relation
        a = max(by_obj[i], key=lambda p: p.confidence)
        b = max(by_obj[j], key=lambda p: p.confidence)
        rel_bad = not relation_holds(rel, a.centroid, b.centroid, size / 8.0)
    elif spec.relation is not None:
        rel_bad = True
    if wrong == 0 and not rel_bad:
        conf = min(p.confidence for ps in by_obj.values() for p in ps)
        return Verdict(0.9 * conf, "Every requested object is present with the right count and arrangement.")
    score = 0.9 - 0.6 * wrong - (0.8 if rel_bad else 0.0)
    return Verdict(max(-1.0, score), f"{wrong} object(s) missing or miscounted"
                   + ("; the requested relation does not hold." if rel_bad else "."))


def region_verdict(spec: Spec, percepts: Sequence[Percept], box: Sequence[float]) -> Verdict:
    """Score of the region ``box`` (module docstring)."""
    x1, y1, x2, y2 = box

    def overlap(p: Percept) -> float:
        return max(0.0, min(x2, p.box[2]) - max(x1, p.box[0])) * max(0.0, min(y2, p.box[3]) - max(y1, p.box[1]))

    inside = [p for p in percepts if overlap(p) > 0]
    if not inside:
        return Verdict(0.0, "Only background in this box.", "white background")
    p = max(inside, key=overlap)
    if p.shape == "other":
        return Verdict(-0.8, "The shape cannot be recognised as a circle, square or triangle.", p.label)
    by_obj, _ = _matches(spec, percepts)
    for i, o in enumerate(spec.objects):
        if (p.shape, p.color) == o.kind:
            if len(by_obj[i]) > o.count:
                return Verdict(0.3 * p.confidence, f"A requested {o.color} {o.shape}, but there are too many of them.",
                               p.label)
            return Verdict(0.9 * p.confidence, f"The {o.color} {o.shape} the prompt asks for.", p.label)
    return Verdict(-0.6, f"The prompt does not ask for a {p.color} {p.shape}.", p.label)


def _tenths_probs(score: float) -> list[float]:
    """A distribution over the 21 tenths with expectation ``score`` (mass on the two nearest tenths)."""
    s = max(-1.0, min(1.0, score)) * 10.0
    lo = math.floor(s)
    w = s - lo
    q = [0.0] * 21
    q[lo + 10] += 1.0 - w
    if w > 0:
        q[lo + 11] += w
    return q


def probe_probs(score: float, suffix: str, chars: Sequence[str]) -> dict[str, float]:
    """Next-character probabilities after ``Score: <suffix>`` for the probe tree of
    :data:`rewards.judge.PROBE_TREE`, consistent with :func:`_tenths_probs` of ``score``."""
    q = _tenths_probs(score)

    def p(t: int) -> float:
        return q[t + 10]

    if suffix == "":
        raw = {"-": sum(p(t) for t in range(-10, 0)), "0": sum(p(t) for t in range(0, 10)), "1": p(10)}
    elif suffix == "-":
        raw = {"1": p(-10), "0": sum(p(t) for t in range(-9, 0))}
    elif suffix == "0.":
        raw = {str(d): p(d) for d in range(10)}
    elif suffix == "-0.":
        raw = {str(d): p(-d) if d > 0 else 0.0 for d in range(10)}
    else:
        raw = {}
    vals = {ch: raw.get(ch, 0.0) for ch in chars}
    tot = sum(vals.values())
    return {ch: v / tot for ch, v in vals.items()} if tot > 0 else {ch: 1.0 / len(chars) for ch in chars}


class ShapesJudge(BaseJudge):
    """The shapes world's understanding module as a judge backend (module docstring).

    ``cfg`` is a ``JudgeConfig`` (only ``mode`` and ``max_tokens`` are used). ``perception``
    defaults to :meth:`ShapesPerception.load_or_train` (cached on disk).
    """

    backend = "shapes"

    def __init__(self, cfg: Any, perception: ShapesPerception | None = None):
        super().__init__(cfg)
        self._perception = perception

    @property
    def perception(self) -> ShapesPerception:
        if self._perception is None:
            self._perception = ShapesPerception.load_or_train()
        return self._perception

    async def check_health(self) -> None:
        _ = self.perception

    def _percepts(self, image: PreparedImage) -> list[Percept]:
        cached = getattr(image, "_shapes_percepts", None)
        if cached is None:
            cached = self.perception.perceive(np.asarray(image.pil))
            image._shapes_percepts = cached  # type: ignore[attr-defined]  # one perception per image
        return cached

    def answer(self, image: PreparedImage, text: str) -> tuple[str, dict[int, Verdict] | Verdict]:
        """(request kind, verdict or per-region verdicts) for one request."""
        kind = request_kind(text) or "unknown"
        prompt = request_prompt(text)
        try:
            spec = parse_prompt(prompt) if prompt is not None else None
        except ValueError:
            spec = None
        if spec is None or kind == "unknown":
            why = "The prompt is outside the shapes world's grammar." if kind != "unknown" else "Unknown request."
            if kind == "regions":
                return kind, {k: Verdict(0.0, why, "unknown") for k in request_boxes(text)}
            return kind, Verdict(0.0, why)
        percepts = self._percepts(image)
        size = image.size[0]
        if kind == "regions":
            return kind, {k: region_verdict(spec, percepts, b) for k, b in request_boxes(text).items()}
        if kind == "sample":
            return kind, sample_verdict(spec, percepts, size)
        if kind == "grounding":
            return kind, Verdict(0.0, json.dumps([{"label": p.label[2:] if p.label.startswith("a ") else p.label,
                                                    "box": list(p.box)} for p in percepts if p.shape != "other"]))
        return kind, global_verdict(spec, percepts, size)

    async def _chat(self, image: PreparedImage, text: str, max_tokens: int,
                    schema: dict[str, Any] | None = None) -> Completion:
        kind, v = self.answer(image, text)
        if kind == "grounding":
            assert isinstance(v, Verdict)
            out = v.reason
        elif isinstance(v, dict):
            if schema is not None:
                out = json.dumps({"regions": [{"id": k, "object": r.obj, "score": round(r.score * 10),
                                               "reason": r.reason} for k, r in sorted(v.items())]})
            else:
                out = "\n".join(f"Region ID: {k}\nIdentified Object: {r.obj}\nScore: {_fmt(r.score)}\n"
                                f"Reason: {r.reason}\n---" for k, r in sorted(v.items()))
        elif schema is not None:
            out = json.dumps({"score": round(v.score * 10), "reason": v.reason})
        else:
            out = f"Score: {_fmt(v.score)}\nReason: {v.reason}"
        return Completion(out, prompt_tokens=0, completion_tokens=len(out.split()))

    async def _next_probs(self, image: PreparedImage, text: str, assistant_prefix: str,
                          chars: Sequence[str]) -> tuple[dict[str, float], Completion, bool]:
        kind, v = self.answer(image, text)
        if isinstance(v, dict):
            m = _PREFIX_REGION.search(assistant_prefix)
            r = v.get(int(m[1])) if m else None
            score = r.score if r is not None else 0.0
        else:
            score = v.score
        suffix = assistant_prefix.rsplit("Score: ", 1)[-1]
        return probe_probs(score, suffix, chars), Completion("", 0, 1), False
