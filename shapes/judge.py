"""The learned understanding module of the shapes world, behind srum's judge and proposer interfaces.

* :class:`shapes.perception.ShapesPerception` -- the learned part: a small CNN over connected
  components that classifies each object's shape and colour (see :mod:`shapes.perception`).
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

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.config import ComponentsRegionsConfig, ShapesJudgeConfig
from rewards import prompts as Q
from rewards.judge import BaseJudge, Completion, PreparedImage
from rewards.regions import Proposal, RegionProposer
from shapes.perception import Percept, ShapesPerception, as_image_array, components
from shapes.world import OPPOSITE, Spec, parse_prompt, relation_holds

__all__ = ["ComponentsProposer", "ShapesJudge", "global_verdict", "region_verdict", "sample_verdict"]


# ----- proposer --------------------------------------------------------------------------------


class ComponentsProposer(RegionProposer):
    """Boxes of the foreground components (:func:`components`), padded by ``pad`` pixels, then the
    standard selection (min area, top-k by component area, IoU de-duplication)."""

    def __init__(self, cfg: ComponentsRegionsConfig, pad: int = 1):
        super().__init__(cfg)
        self.pad = int(pad)

    def propose_sync(self, image: Any) -> list[Proposal]:
        arr = as_image_array(image)
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

    ``cfg`` is the judge section (only ``mode`` and ``max_tokens`` are used). ``perception``
    defaults to :meth:`ShapesPerception.load_or_train` (cached on disk).
    """

    backend = "shapes"

    def __init__(self, cfg: ShapesJudgeConfig, perception: ShapesPerception | None = None):
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
