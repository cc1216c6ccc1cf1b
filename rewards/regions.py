"""Region proposers (segment-anything masks or the judge's own grounding) and keyword filtering.

Boxes are pixel ``(x1, y1, x2, y2)`` with **exclusive** ends, the convention of
:mod:`rewards.reward_map` (an integer box covers exactly ``R[y1:y2, x1:x2]``). segment-anything's
``bbox`` is XYWH where ``w = max - min`` of the mask's pixel indices (``batched_mask_to_box`` gives
inclusive edges), so a mask spanning columns 3..7 has ``x = 3, w = 4`` and becomes ``x1 = 3,
x2 = x + w + 1 = 8`` (:func:`sam_bbox_to_box`).

Selection (:func:`select_regions`, both proposers): drop boxes whose area is under
``min_area_frac`` of the image, sort by area (the mask's pixel count for SAM, the box area for
grounding) largest first, skip a box whose IoU with an already kept one is ``>= dedup_iou``, keep
the first ``top_k`` (the authors keep SAM's 5 largest masks).

Keyword filter (:func:`keyword_filter`): a judged region is kept when the object the judge named
for it ("Identified Object") shares a content word with the prompt. Words are lower-cased
alphabetic tokens minus stopwords (function words, colours, numbers, sizes, spatial words and
photo words, so that "red" or "left" alone never makes a match: an approximation of "the prompt's
nouns" without a POS tagger), with simple plural stripping ("boxes" -> "box", "cherries" ->
"cherry", "cats" -> "cat"). A region whose object is unknown is kept (nothing to judge it by).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from core.config import GroundingRegionsConfig, RegionsConfig, SamRegionsConfig
from rewards import parse as P
from rewards import prompts as Q

log = logging.getLogger("srum.regions")

Box = tuple[float, float, float, float]


class Proposal(BaseModel):
    """One proposed region: pixel box (exclusive ends), area used for ranking, optional label."""

    model_config = ConfigDict(frozen=True)
    box: Box = Field(description="pixel (x1, y1, x2, y2), exclusive x2/y2")
    area: float = Field(description="ranking area: mask pixels (SAM) or box area (grounding)")
    label: str = Field("", description="label from the proposer (grounding), '' for SAM")


# ----- pure box helpers --------------------------------------------------------------------------


def sam_bbox_to_box(bbox: Sequence[float]) -> Box:
    """segment-anything XYWH (w = max - min of pixel indices) -> exclusive (x1, y1, x2, y2)."""
    x, y, w, h = (float(v) for v in bbox)
    return (x, y, x + w + 1.0, y + h + 1.0)


def box_area(box: Sequence[float]) -> float:
    return max(0.0, float(box[2]) - float(box[0])) * max(0.0, float(box[3]) - float(box[1]))


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two exclusive-end boxes (0 when both are empty)."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = box_area(a) + box_area(b) - inter
    return inter / union if union > 0 else 0.0


def select_regions(cands: Iterable[Proposal], width: int, height: int, top_k: int = 5,
                   min_area_frac: float = 0.01, dedup_iou: float = 0.9) -> list[Proposal]:
    """Min-area filter, sort by area (stable), IoU de-duplication, keep ``top_k`` (module docstring)."""
    min_area = min_area_frac * width * height
    ranked = sorted((c for c in cands if box_area(c.box) > 0 and box_area(c.box) >= min_area),
                    key=lambda c: -c.area)
    kept: list[Proposal] = []
    for c in ranked:
        if len(kept) >= top_k:
            break
        if all(box_iou(c.box, k.box) < dedup_iou for k in kept):
            kept.append(c)
    return kept


def masks_to_proposals(masks: Iterable[dict[str, Any]]) -> list[Proposal]:
    """SamAutomaticMaskGenerator records -> proposals (empty masks are skipped)."""
    return [Proposal(box=sam_bbox_to_box(m["bbox"]), area=float(m["area"])) for m in masks if m.get("area", 0) > 0]


# ----- SAM ---------------------------------------------------------------------------------------


def build_tiny_sam(seed: int = 0) -> Any:
    """A tiny random ``Sam`` (img_size 128, ViT depth 2; recipe in ../shared/notes/TINY_MODELS.md)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, out_chans=32,
                                      qkv_bias=True, use_rel_pos=True, window_size=4, global_attn_indexes=[1],
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def _as_array(image: Any) -> np.ndarray:
    if hasattr(image, "pil"):  # rewards.judge.PreparedImage
        image = image.pil
    arr = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"image must be uint8 HxWx3, got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


class RegionProposer:
    """Base: ``propose`` (sync, boxes) and ``apropose`` (async, proposals); ``cfg`` is its regions section
    (the composition root, :mod:`srum.registry`, maps ``regions.proposer`` to the class)."""

    def __init__(self, cfg: RegionsConfig):
        self.cfg = cfg
        self.calls = 0
        self.proposed = 0

    async def apropose(self, image: Any, prompt: str) -> list[Proposal]:
        return []

    def propose(self, image: Any, prompt: str) -> list[Box]:
        """Boxes for ``image`` (uint8 HxWx3); runs :meth:`apropose` (not from inside a running loop)."""
        return [p.box for p in asyncio.run(self.apropose(image, prompt))]

    def _select(self, cands: list[Proposal], width: int, height: int) -> list[Proposal]:
        """The :func:`select_regions` of ``cands`` under this section's top_k / min_area_frac / dedup_iou."""
        kept = select_regions(cands, width, height, self.cfg.top_k, self.cfg.min_area_frac, self.cfg.dedup_iou)
        self.calls += 1
        self.proposed += len(kept)
        return kept

    def counters(self) -> dict[str, Any]:
        return {"proposer": type(self).__name__, "calls": self.calls, "proposed": self.proposed}


class NoneProposer(RegionProposer):
    """No regions (the reward map is then the background, or sample-level)."""


class SamProposer(RegionProposer):
    """segment-anything's automatic mask generator (``regions.model_type``; ``"tiny"`` = random tiny SAM)."""

    def __init__(self, cfg: SamRegionsConfig, device: str | None = None):
        super().__init__(cfg)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._gen: Any = None
        self._lock = threading.Lock()

    def generator(self) -> Any:
        """Build the model and mask generator once (thread-safe)."""
        with self._lock:
            if self._gen is None:
                from segment_anything import SamAutomaticMaskGenerator, sam_model_registry

                cfg = self.cfg
                if cfg.model_type == "tiny":
                    sam = build_tiny_sam()
                else:
                    sam = sam_model_registry[cfg.model_type](checkpoint=None)
                    if cfg.checkpoint is None:
                        log.warning("regions.checkpoint is null: SAM %s has random weights", cfg.model_type)
                    else:  # weights only: nothing in the file is unpickled beyond tensors
                        sam.load_state_dict(torch.load(cfg.checkpoint, map_location="cpu", weights_only=True))
                self._gen = SamAutomaticMaskGenerator(
                    sam.to(self.device).eval(), points_per_side=cfg.points_per_side,
                    pred_iou_thresh=cfg.pred_iou_thresh, stability_score_thresh=cfg.stability_score_thresh)
            return self._gen

    def propose_sync(self, image: Any) -> list[Proposal]:
        arr = _as_array(image)
        gen = self.generator()
        with self._lock, torch.no_grad():
            masks = gen.generate(arr)
        return self._select(masks_to_proposals(masks), arr.shape[1], arr.shape[0])

    async def apropose(self, image: Any, prompt: str) -> list[Proposal]:
        return await asyncio.to_thread(self.propose_sync, image)


class GroundingProposer(RegionProposer):
    """Ask the judge's VLM for the prompt's objects as JSON pixel boxes (Qwen2.5-VL style).

    The request uses :func:`rewards.prompts.grounding_prompt`; unless the judge is in ``text`` mode
    the answer is constrained by :func:`rewards.prompts.grounding_json_schema`. Answers are read
    by :func:`rewards.parse.parse_grounding_json` (fences, prose, ``bbox_2d``/``box`` keys; bad
    entries skipped and counted in ``bad_answers`` / ``unparsable``).
    """

    def __init__(self, cfg: GroundingRegionsConfig, judge: Any):
        super().__init__(cfg)
        self.judge = judge
        self.bad_answers = 0  # answers with at least one invalid box
        self.unparsable = 0  # answers with no usable JSON list

    async def apropose(self, image: Any, prompt: str) -> list[Proposal]:
        arr = _as_array(image)
        h, w = arr.shape[:2]
        schema = None if getattr(self.judge, "mode", "text") == "text" else Q.grounding_json_schema(w, h)
        comp = await self.judge.complete(image if hasattr(image, "pil") else arr, Q.grounding_prompt(prompt, w, h),
                                         schema=schema, kind="grounding")
        parsed = P.parse_grounding_json(comp.text, w, h)
        self.bad_answers += P.W_BAD_BOX in parsed.warnings
        self.unparsable += P.W_BAD_JSON in parsed.warnings or P.W_EMPTY in parsed.warnings
        cands = [Proposal(box=b.box, area=box_area(b.box), label=b.label) for b in parsed.boxes]
        return self._select(cands, w, h)

    def counters(self) -> dict[str, Any]:
        return {**super().counters(), "bad_answers": self.bad_answers, "unparsable": self.unparsable}


# ----- keyword filter ----------------------------------------------------------------------------

STOPWORDS: frozenset[str] = frozenset("""
a an the of and or but with without in on at to from by for into onto over under above below behind
beside besides near next between among around across through inside outside front back left right top
bottom middle center centre side far close up down is are was were be being been it its this that these
those there here which who whose what where when while as than then very some any each every all both
no not one two three four five six seven eight nine ten eleven twelve many several few pair couple
single multiple lot lots of red orange yellow green blue purple violet pink brown black white gray grey
golden silver colorful colourful dark light bright small big large tiny huge giant little tall short long
wide narrow old new young photo photograph picture image painting drawing illustration render rendering
style view scene shot realistic detailed high quality beautiful cute his her their our my your
""".split())

_WORD = re.compile(r"[a-z]+")


def singular(word: str) -> str:
    """Simple plural stripping: cherries->cherry, boxes->box, glasses->glass, cats->cat."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("sses", "xes", "ches", "shes", "zes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def content_words(text: str, stopwords: frozenset[str] = STOPWORDS) -> set[str]:
    """Lower-cased alphabetic tokens without stopwords or 1-letter words, plurals stripped."""
    words = _WORD.findall((text or "").lower())
    return {singular(w) for w in words if len(w) > 1 and w not in stopwords and singular(w) not in stopwords}


def keyword_match(label: str | None, prompt: str, stopwords: frozenset[str] = STOPWORDS) -> bool | None:
    """True/False when ``label`` shares / shares no content word with ``prompt``; None when unknown."""
    words = content_words(label or "", stopwords)
    if not words:
        return None
    return bool(words & content_words(prompt, stopwords))


def keyword_filter(regions: Sequence[Any], prompt: str, enabled: bool = True,
                   stopwords: frozenset[str] = STOPWORDS) -> tuple[list[Any], int]:
    """Keep regions (objects with ``.label``) related to ``prompt``; returns (kept, n_dropped).

    ``enabled=False`` keeps all. A region with no usable label is kept.
    """
    if not enabled:
        return list(regions), 0
    kept = [r for r in regions if keyword_match(getattr(r, "label", None), prompt, stopwords) is not False]
    return kept, len(regions) - len(kept)
