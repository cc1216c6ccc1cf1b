"""Region proposers: SAM box conversion, selection, tiny SAM, grounding parsing, keyword filter."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import batched_mask_to_box, box_xyxy_to_xywh

from core.config import GroundingRegionsConfig, NoRegionsConfig, SamRegionsConfig
from core.records import Region
from rewards.judge import Completion
from rewards.regions import (
    GroundingProposer,
    NoneProposer,
    Proposal,
    SamProposer,
    box_iou,
    content_words,
    keyword_filter,
    keyword_match,
    masks_to_proposals,
    sam_bbox_to_box,
    select_regions,
    singular,
)
from srum.registry import make_proposer


def sam_records(masks: list[np.ndarray]) -> list[dict]:
    """What SamAutomaticMaskGenerator reports for these masks (its own box code)."""
    t = torch.as_tensor(np.stack(masks))
    xywh = [box_xyxy_to_xywh(b).tolist() for b in batched_mask_to_box(t)]  # as SAM does, box by box
    return [{"bbox": b, "area": int(m.sum()), "segmentation": m} for b, m in zip(xywh, masks, strict=True)]


def rect(h, w, y1, y2, x1, x2):
    m = np.zeros((h, w), bool)
    m[y1:y2, x1:x2] = True
    return m


def test_sam_xywh_to_exclusive_box_on_hand_made_masks():
    masks = [rect(20, 30, 2, 7, 3, 8),  # rows 2..6, cols 3..7
             rect(20, 30, 0, 20, 0, 30),  # whole image
             rect(20, 30, 19, 20, 29, 30)]  # the last pixel only
    recs = sam_records(masks)
    assert recs[0]["bbox"] == [3, 2, 4, 4]  # SAM: w = max - min of indices
    props = masks_to_proposals(recs)
    assert [p.box for p in props] == [(3.0, 2.0, 8.0, 7.0), (0.0, 0.0, 30.0, 20.0), (29.0, 19.0, 30.0, 20.0)]
    for m, p in zip(masks, props, strict=True):  # the box covers exactly the mask's rows/cols
        x1, y1, x2, y2 = (int(v) for v in p.box)
        assert m[y1:y2, x1:x2].all() and m.sum() == (x2 - x1) * (y2 - y1)
    assert sam_bbox_to_box([0, 0, 0, 0]) == (0.0, 0.0, 1.0, 1.0)


def test_empty_masks_are_skipped():
    recs = sam_records([rect(10, 10, 0, 0, 0, 0), rect(10, 10, 1, 3, 1, 3)])
    assert [p.box for p in masks_to_proposals(recs)] == [(1.0, 1.0, 3.0, 3.0)]


def test_select_topk_by_area_min_area_and_iou_dedup():
    W = H = 100  # min_area_frac 0.01 -> 100 px
    cands = [Proposal(box=(0, 0, 10, 9), area=90),  # box 90 px < 100: dropped
             Proposal(box=(0, 0, 50, 50), area=2500),
             Proposal(box=(0, 0, 50, 49), area=2400),  # IoU 0.98 with the previous: duplicate
             Proposal(box=(50, 50, 100, 100), area=2000),
             Proposal(box=(0, 60, 20, 80), area=300),
             Proposal(box=(60, 0, 90, 20), area=500),
             Proposal(box=(20, 20, 40, 40), area=400)]
    kept = select_regions(cands, W, H, top_k=3, min_area_frac=0.01, dedup_iou=0.9)
    assert [p.area for p in kept] == [2500, 2000, 500]
    kept5 = select_regions(cands, W, H, top_k=5, min_area_frac=0.01, dedup_iou=0.9)
    assert [p.area for p in kept5] == [2500, 2000, 500, 400, 300]
    loose = select_regions(cands, W, H, top_k=5, min_area_frac=0.0, dedup_iou=1.0)
    assert [p.area for p in loose] == [2500, 2400, 2000, 500, 400]


def test_box_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0


def test_tiny_sam_proposes_valid_boxes():
    img = np.zeros((64, 80, 3), np.uint8)
    img[10:30, 5:40] = (255, 0, 0)
    img[35:60, 30:75] = (0, 0, 255)
    cfg = SamRegionsConfig(points_per_side=4)
    prop = make_proposer(cfg)
    assert isinstance(prop, SamProposer)
    boxes = prop.propose(img, "a red box")
    assert 1 <= len(boxes) <= cfg.top_k
    for x1, y1, x2, y2 in boxes:
        assert 0 <= x1 < x2 <= 80 and 0 <= y1 < y2 <= 64
        assert (x2 - x1) * (y2 - y1) >= cfg.min_area_frac * 64 * 80
    assert prop.counters()["calls"] == 1
    with pytest.raises(ValueError, match="uint8"):
        prop.propose(img.astype(np.float32), "x")


class StubJudge:
    def __init__(self, text, mode="text"):
        self.text, self.mode, self.calls = text, mode, []

    async def complete(self, image, text, max_tokens=None, schema=None, kind="grounding"):
        self.calls.append((text, schema))
        return Completion(self.text)


def test_grounding_parses_fenced_json_and_skips_bad_entries():
    answer = ('Sure! Here are the objects:\n```json\n[{"bbox_2d": [10, 5, 40, 30], "label": "cat"},\n'
              ' {"bbox_2d": [1, 2, 3], "label": "broken"},\n {"box": [50, 20, 200, 60], "label": "dog"},\n'
              ' {"bbox_2d": [30, 30, 30, 40], "label": "empty"}]\n```\nDone.')
    judge = StubJudge(answer)
    prop = make_proposer(GroundingRegionsConfig(), judge=judge)
    assert isinstance(prop, GroundingProposer)
    img = np.zeros((48, 64, 3), np.uint8)
    props = asyncio.run(prop.apropose(img, "a cat and a dog"))
    # the dog box is clipped to the image: (50, 20, 64, 48), area 14 * 28 = 392 < cat 30 * 25 = 750
    assert [(p.label, p.box) for p in props] == [("cat", (10.0, 5.0, 40.0, 30.0)), ("dog", (50.0, 20.0, 64.0, 48.0))]
    assert prop.bad_answers == 1 and prop.unparsable == 0
    text, schema = judge.calls[0]
    assert "64 pixels wide" in text and schema is None
    assert asyncio.run(make_proposer(GroundingRegionsConfig(), judge=StubJudge("no idea")).apropose(
        img, "x")) == []


def test_grounding_structured_sends_schema():
    judge = StubJudge('[{"label": "cat", "box": [0, 0, 32, 24]}]', mode="structured")
    prop = GroundingProposer(GroundingRegionsConfig(), judge)
    boxes = prop.propose(np.zeros((48, 64, 3), np.uint8), "a cat")
    assert boxes == [(0.0, 0.0, 32.0, 24.0)]
    assert judge.calls[0][1]["type"] == "array"


def test_make_proposer_errors_and_none():
    with pytest.raises(ValueError, match="needs the judge"):
        make_proposer(GroundingRegionsConfig())
    none = make_proposer(NoRegionsConfig())
    assert isinstance(none, NoneProposer) and none.propose(np.zeros((8, 8, 3), np.uint8), "x") == []


def test_keyword_tokenisation():
    assert singular("cherries") == "cherry" and singular("boxes") == "box" and singular("cats") == "cat"
    assert singular("glass") == "glass" and singular("bus") == "bus"
    assert content_words("Two red Cats on the LEFT of a wooden table.") == {"cat", "wooden", "table"}


def test_keyword_filter():
    prompt = "two cats sitting to the left of a red bicycle"
    regions = [Region(box=(0, 0, 1, 1), score=0.5, label="A fluffy cat"),
               Region(box=(0, 0, 1, 1), score=0.5, label="red wall"),  # only a colour in common
               Region(box=(0, 0, 1, 1), score=0.5, label="Bicycles"),
               Region(box=(0, 0, 1, 1), score=0.5, label=""),  # unknown: kept
               Region(box=(0, 0, 1, 1), score=0.5, label="sky")]
    kept, dropped = keyword_filter(regions, prompt)
    assert [r.label for r in kept] == ["A fluffy cat", "Bicycles", ""] and dropped == 2
    assert keyword_filter(regions, prompt, enabled=False) == (regions, 0)
    assert keyword_match(None, prompt) is None and keyword_match("the", prompt) is None
