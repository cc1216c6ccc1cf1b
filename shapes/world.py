"""The shapes world: a prompt grammar over shapes, colours, counts and relative positions, a
train / held-out split with unseen combinations, and a ground-truth renderer.

Grammar (``prompt_of`` / ``parse_prompt`` are exact inverses on it)::

    object   := ("a" | "two" | "three") COLOR SHAPE["s" when count > 1]
    single   := object                                  count 1     "a red circle"
    counting := object                                  count 2..3  "two blue squares"
    binding  := object "and" object                     count 1     "a red circle and a blue square"
    spatial  := object REL object                       count 1     "a red circle to the left of a blue square"
    REL      := "to the left of" | "to the right of" | "above" | "below"

The two objects of a binding or spatial prompt differ in both shape and colour, so a swapped
colour binding is visible and each object is unique in a correct image.

Relation semantics (:func:`relation_holds`, shared by the renderer, the evaluator and the judge
because it *is* the meaning of the words): with centroids ``a`` and ``b`` in pixels (y down),
"a left of b" holds when ``b.x - a.x >= margin`` and the horizontal offset dominates the
vertical one (``|dx| > |dy|``); likewise for the others. The evaluator's margin is ``size / 8``;
the renderer places objects with the stricter margin ``size / 6`` (and ``|d_orth| <= |d_axis| / 2``)
so that ground truth holds with room to spare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.prompt_sets import PromptRecord

__all__ = [
    "BACKGROUND", "CATEGORIES", "COLORS", "COUNT_WORDS", "RELATIONS", "SHAPES", "ObjSpec", "Spec",
    "all_specs", "connected_components", "make_split", "parse_prompt", "prompt_of", "relation_holds",
    "prompt_records", "render", "shape_mask", "split_info",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (40, 60, 220),
    "yellow": (235, 200, 20),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single", "counting", "color_binding", "spatial")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
_WORD_COUNTS: dict[str, int] = {"a": 1, "one": 1, "two": 2, "three": 3}
_REL_TEXT: dict[str, str] = {"left of": "to the left of", "right of": "to the right of", "above": "above",
                             "below": "below"}
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ObjSpec:
    """``count`` objects of one shape and colour."""

    shape: str
    color: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape {self.shape!r} not in {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"color {self.color!r} not in {tuple(COLORS)}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count {self.count!r} not in {tuple(COUNT_WORDS)}")

    @property
    def kind(self) -> tuple[str, str]:
        return (self.shape, self.color)


@dataclass(frozen=True)
class Spec:
    """A prompt's meaning: objects and an optional relation ``(i, rel, j)`` between objects i and j."""

    objects: tuple[ObjSpec, ...]
    relation: tuple[int, str, int] | None = None

    def __post_init__(self) -> None:
        n = len(self.objects)
        if n not in (1, 2):
            raise ValueError(f"a spec has 1 or 2 objects, got {n}")
        if n == 2:
            a, b = self.objects
            if a.count != 1 or b.count != 1:
                raise ValueError("two-object specs have count 1 per object")
            if a.shape == b.shape or a.color == b.color:
                raise ValueError(f"the two objects must differ in shape and colour: {a}, {b}")
        if self.relation is not None:
            if n != 2:
                raise ValueError("a relation needs two objects")
            i, rel, j = self.relation
            if (i, j) != (0, 1) or rel not in RELATIONS:
                raise ValueError(f"relation must be (0, one of {RELATIONS}, 1), got {self.relation}")

    @property
    def category(self) -> str:
        if self.relation is not None:
            return "spatial"
        if len(self.objects) == 2:
            return "color_binding"
        return "counting" if self.objects[0].count > 1 else "single"


# ----- text ---------------------------------------------------------------------------------------


def _obj_text(o: ObjSpec) -> str:
    return f"{COUNT_WORDS[o.count]} {o.color} {o.shape}{'s' if o.count > 1 else ''}"


def prompt_of(spec: Spec) -> str:
    """The prompt text of ``spec`` (see the module grammar)."""
    objs = [_obj_text(o) for o in spec.objects]
    if spec.relation is not None:
        return f"{objs[0]} {_REL_TEXT[spec.relation[1]]} {objs[1]}"
    return " and ".join(objs)


def _parse_obj(words: Sequence[str], text: str) -> ObjSpec:
    if len(words) != 3:
        raise ValueError(f"cannot parse shapes prompt {text!r}: expected '<count> <color> <shape>', got {' '.join(words)!r}")
    cw, color, shape = words
    if cw not in _WORD_COUNTS:
        raise ValueError(f"cannot parse shapes prompt {text!r}: unknown count word {cw!r}")
    count = _WORD_COUNTS[cw]
    if count > 1:
        if not shape.endswith("s"):
            raise ValueError(f"cannot parse shapes prompt {text!r}: {cw} needs a plural, got {shape!r}")
        shape = shape[:-1]
    if color not in COLORS or shape not in SHAPES:
        raise ValueError(f"cannot parse shapes prompt {text!r}: unknown colour/shape {color!r} {shape!r}")
    return ObjSpec(shape, color, count)


def parse_prompt(text: str) -> Spec:
    """Inverse of :func:`prompt_of`; raises ``ValueError`` (naming the text) outside the grammar.

    Case and surrounding/repeated whitespace are ignored; "one" is read as "a".
    """
    if not isinstance(text, str):
        raise ValueError(f"shapes prompt must be a str, got {type(text).__name__}")
    words = text.lower().split()
    joined = " ".join(words)
    for rel, phrase in _REL_TEXT.items():
        pw = phrase.split()
        for k in range(len(words) - len(pw) + 1):
            if words[k:k + len(pw)] == pw:
                a, b = _parse_obj(words[:k], text), _parse_obj(words[k + len(pw):], text)
                try:
                    return Spec((a, b), (0, rel, 1))
                except ValueError as err:
                    raise ValueError(f"cannot parse shapes prompt {text!r}: {err}") from None
    if "and" in words:
        k = words.index("and")
        a, b = _parse_obj(words[:k], text), _parse_obj(words[k + 1:], text)
        try:
            return Spec((a, b))
        except ValueError as err:
            raise ValueError(f"cannot parse shapes prompt {text!r}: {err}") from None
    if not joined:
        raise ValueError("cannot parse an empty shapes prompt")
    return Spec((_parse_obj(words, text),))


# ----- enumeration and split -----------------------------------------------------------------------


def all_specs() -> dict[str, list[Spec]]:
    """Every spec of the grammar by category, in a fixed order."""
    kinds = [(s, c) for s in SHAPES for c in COLORS]
    pairs = [(a, b) for a in kinds for b in kinds if a[0] != b[0] and a[1] != b[1]]
    return {
        "single": [Spec((ObjSpec(s, c),)) for s, c in kinds],
        "counting": [Spec((ObjSpec(s, c, n),)) for n in (2, 3) for s, c in kinds],
        "color_binding": [Spec((ObjSpec(*a), ObjSpec(*b))) for a, b in pairs],
        "spatial": [Spec((ObjSpec(*a), ObjSpec(*b)), (0, r, 1)) for r in RELATIONS for a, b in pairs],
    }


@dataclass(frozen=True)
class SplitInfo:
    """What :func:`make_split` held out: kinds never in two-object training prompts, and
    (shape_a, relation, shape_b) combinations never in training spatial prompts."""

    held_kinds: tuple[tuple[str, str], ...]
    held_combos: tuple[tuple[str, str, str], ...]


def split_info(seed: int = 0) -> SplitInfo:
    """The held-out kinds and relation combos of :func:`make_split` for ``seed``."""
    rng = np.random.default_rng(seed)
    shapes = list(rng.permutation(SHAPES))
    colors = list(rng.permutation(list(COLORS)))
    held_kinds = ((str(shapes[0]), str(colors[0])), (str(shapes[1]), str(colors[1])))
    combos = [(a, r, b) for a in SHAPES for b in SHAPES if a != b for r in RELATIONS]
    idx = rng.choice(len(combos), size=2, replace=False)
    return SplitInfo(held_kinds, tuple(combos[int(i)] for i in sorted(idx)))


def _is_unseen(spec: Spec, info: SplitInfo) -> bool:
    if any(o.kind in info.held_kinds for o in spec.objects):
        return True
    if spec.relation is not None:
        a, b = spec.objects
        return (a.shape, spec.relation[1], b.shape) in info.held_combos
    return False


def make_split(seed: int = 0, n_heldout: dict[str, int] | None = None) -> tuple[list[Spec], list[Spec]]:
    """Deterministic (train, held-out) split of :func:`all_specs`.

    * single / counting: a random part is held out (the held-out kinds' own single and counting
      prompts stay in training, so the generator has seen each kind drawn alone).
    * color_binding / spatial: every prompt with an unseen combination (a held-out kind from
      :func:`split_info`, or for spatial a held-out (shape, relation, shape) combo) is excluded
      from training; held-out takes ``n`` of them (3/4) plus seen-combination prompts that were
      removed from training (1/4).
    Defaults: single 4, counting 6, color_binding 16, spatial 40 held-out prompts.
    """
    want = {"single": 4, "counting": 6, "color_binding": 16, "spatial": 40, **(n_heldout or {})}
    info = split_info(seed)
    rng = np.random.default_rng(seed + 1)
    train: list[Spec] = []
    held: list[Spec] = []
    for cat, specs in all_specs().items():
        if cat in ("single", "counting"):
            pool = [s for s in specs if s.objects[0].kind not in info.held_kinds]
            pick = {int(i) for i in rng.choice(len(pool), size=want[cat], replace=False)}
            out = [pool[i] for i in sorted(pick)]
            held += out
            train += [s for s in specs if s not in out]
            continue
        unseen = [s for s in specs if _is_unseen(s, info)]
        seen = [s for s in specs if not _is_unseen(s, info)]
        n_unseen = min(len(unseen), (3 * want[cat] + 3) // 4)
        n_seen = want[cat] - n_unseen
        pu = sorted(int(i) for i in rng.choice(len(unseen), size=n_unseen, replace=False))
        ps = {int(i) for i in rng.choice(len(seen), size=n_seen, replace=False)}
        held += [unseen[i] for i in pu] + [seen[i] for i in sorted(ps)]
        train += [s for k, s in enumerate(seen) if k not in ps]
    return train, held


def prompt_records(split_seed: int = 0, which: str = "train") -> list[PromptRecord]:
    """The ``train`` or ``heldout`` prompts of the split of ``split_seed`` as prompt records (id = index,
    category = the spec's), the one source of the world's prompt sets."""
    if which not in ("train", "heldout"):
        raise ValueError(f"which must be 'train' or 'heldout', got {which!r}")
    specs = make_split(split_seed)[which == "heldout"]
    return [PromptRecord(id=f"{which}-{i}", text=prompt_of(s), category=s.category) for i, s in enumerate(specs)]


# ----- relation semantics ----------------------------------------------------------------------


def relation_holds(rel: str, a: Sequence[float], b: Sequence[float], margin: float) -> bool:
    """Whether centroid ``a`` (x, y) is ``rel`` centroid ``b`` (y grows downward); module docstring."""
    dx, dy = float(b[0]) - float(a[0]), float(b[1]) - float(a[1])
    if rel == "left of":
        return dx >= margin and abs(dx) > abs(dy)
    if rel == "right of":
        return -dx >= margin and abs(dx) > abs(dy)
    if rel == "above":
        return dy >= margin and abs(dy) > abs(dx)
    if rel == "below":
        return -dy >= margin and abs(dy) > abs(dx)
    raise ValueError(f"relation {rel!r} not in {RELATIONS}")


# ----- rendering ---------------------------------------------------------------------------------


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size, size] mask of one shape with centre (cx, cy) and half-extent ``r`` (pixel centres
    at integer + 0.5). Circle: radius r; square: side 2r; triangle: apex up, base 2r, height 2r."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return (np.abs(x - cx) <= r) & (np.abs(y - cy) <= r)
    if shape == "triangle":
        top, bottom = cy - r, cy + r
        half = (y - top) / 2.0  # half-width grows from 0 at the apex to r at the base
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half)
    raise ValueError(f"shape {shape!r} not in {SHAPES}")


def _place(n: int, size: int, rng: np.random.Generator, rel: str | None,
           max_tries: int = 2000) -> list[tuple[float, float, float]]:
    """(cx, cy, r) for ``n`` objects: inside the image, bounding boxes >= 2 px apart, relation kept."""
    lo_r, hi_r = size / 8.0, size / 6.0
    margin = size / 6.0
    for _ in range(max_tries):
        out: list[tuple[float, float, float]] = []
        ok = True
        for _k in range(n):
            r = float(rng.uniform(lo_r, hi_r))
            cx, cy = (float(v) for v in rng.uniform(r + 1.0, size - r - 1.0, size=2))
            if any(abs(cx - ox) < r + orr + 2.0 and abs(cy - oy) < r + orr + 2.0 for ox, oy, orr in out):
                ok = False
                break
            out.append((cx, cy, r))
        if not ok:
            continue
        if rel is not None:
            (ax, ay, _), (bx, by, _) = out
            dx, dy = bx - ax, by - ay
            axis, orth = (dx, dy) if rel in ("left of", "right of") else (dy, dx)
            sign = 1.0 if rel in ("left of", "above") else -1.0
            if sign * axis < margin or abs(orth) > abs(axis) / 2.0:
                continue
        return out
    raise RuntimeError(f"could not place {n} objects in a {size}px image (relation {rel!r})")


def render(spec: Spec, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """Ground-truth image of ``spec``: uint8 [size, size, 3], flat colours on a white background.

    Objects have half-extent ``r`` in [size/8, size/6], do not overlap (bounding boxes at least
    2 px apart) and, for spatial specs, satisfy the relation with margin ``size / 6``.
    """
    rng = rng if rng is not None else np.random.default_rng()
    items = [(o.shape, o.color) for o in spec.objects for _ in range(o.count)]
    rel = spec.relation[1] if spec.relation is not None else None
    placed = _place(len(items), size, rng, rel)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    for (shape, color), (cx, cy, r) in zip(items, placed, strict=True):
        img[shape_mask(shape, cx, cy, r, size)] = COLORS[color]
    return img


# ----- connected components (no scipy here) ----------------------------------------------------


def connected_components(mask: np.ndarray, connectivity: int = 4) -> tuple[np.ndarray, int]:
    """Label the connected True regions of a 2-D boolean mask: (labels int32 with 0 = background and
    1..n in raster order of each component's first pixel, n). ``connectivity`` 4 or 8.

    Vectorised min-label propagation (iterations ~ the longest path inside a component), plenty for
    the 32..128 px images of this world.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {m.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = m.shape
    big = h * w + 1
    lab = np.where(m, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    shifts = [(0, 1), (0, -1), (1, 0), (-1, 0)]
    if connectivity == 8:
        shifts += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    while True:
        pad = np.pad(lab, 1, constant_values=big)
        new = lab.copy()
        for dy, dx in shifts:
            new = np.minimum(new, pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w])
        new = np.where(m, new, big)
        if np.array_equal(new, lab):
            break
        lab = new
    roots = np.unique(lab[m])
    out = np.zeros((h, w), dtype=np.int32)
    if roots.size:
        out[m] = np.searchsorted(roots, lab[m]) + 1
    return out, int(roots.size)
