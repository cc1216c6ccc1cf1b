"""Shapes world: grammar round trip, split properties, renderer, labelling and evaluator agreement."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from shapes.evaluator import accuracy, check, classify_shape, detect, pixel_colors
from shapes.world import (
    COLORS,
    RELATIONS,
    SHAPES,
    ObjSpec,
    Spec,
    all_specs,
    connected_components,
    make_split,
    parse_prompt,
    prompt_of,
    prompt_records,
    relation_holds,
    render,
    shape_mask,
    split_info,
)


def blur3(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    h, w = img.shape[:2]
    p = np.pad(f, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return (sum(p[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0).round().astype(np.uint8)


def noisy(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def renders():
    train, held = make_split(0)
    rng = np.random.default_rng(7)
    specs = train + held
    sel = [specs[i] for i in rng.choice(len(specs), 200, replace=False)]
    return sel, [render(s, 32, rng) for s in sel]


# ----- grammar --------------------------------------------------------------------------------


def test_prompt_examples_hand_written():
    s = Spec((ObjSpec("circle", "red"), ObjSpec("square", "blue")), (0, "left of", 1))
    assert prompt_of(s) == "a red circle to the left of a blue square"
    assert s.category == "spatial"
    assert prompt_of(Spec((ObjSpec("triangle", "green", 3),))) == "three green triangles"
    assert parse_prompt("Two  Yellow squares ") == Spec((ObjSpec("square", "yellow", 2),))
    assert parse_prompt("one red circle") == Spec((ObjSpec("circle", "red"),))
    b = parse_prompt("a red circle and a blue square")
    assert b.category == "color_binding" and b.relation is None
    assert parse_prompt("a blue square below a red circle").relation == (0, "below", 1)


def test_parse_is_inverse_on_every_train_and_heldout_prompt():
    train, held = make_split(0)
    for s in train + held:
        assert parse_prompt(prompt_of(s)) == s


@pytest.mark.parametrize("text", ["", "a purple circle", "a red hexagon", "two red circle", "a red circles",
                                  "a red circle and a red square", "a red circle above a red circle",
                                  "a red circle next to a blue square", "four red circles", "red circle"])
def test_parse_rejects_outside_grammar(text):
    with pytest.raises(ValueError):
        parse_prompt(text)


def test_spec_validation():
    with pytest.raises(ValueError):
        ObjSpec("hexagon", "red")
    with pytest.raises(ValueError):
        Spec((ObjSpec("circle", "red", 2), ObjSpec("square", "blue")))
    with pytest.raises(ValueError):
        Spec((ObjSpec("circle", "red"),), (0, "left of", 1))


# ----- split ---------------------------------------------------------------------------------


def test_split_sizes_disjoint_and_deterministic():
    train, held = make_split(0)
    assert 200 <= len(train) <= 400 and 60 <= len(held) <= 100
    assert not set(train) & set(held)
    assert len(set(train)) == len(train) and len(set(held)) == len(held)
    assert make_split(0) == (train, held)
    assert make_split(1) != (train, held)
    assert Counter(s.category for s in held) == {"single": 4, "counting": 6, "color_binding": 16, "spatial": 40}
    n_all = sum(len(v) for v in all_specs().values())
    assert n_all == 12 + 24 + 72 + 288


def test_heldout_has_unseen_combinations():
    train, held = make_split(0)
    info = split_info(0)
    two_obj_train_kinds = {o.kind for s in train if len(s.objects) == 2 for o in s.objects}
    # held-out kinds never appear in two-object training prompts, but are drawn alone in training
    for kind in info.held_kinds:
        assert kind not in two_obj_train_kinds
        assert any(s.objects[0].kind == kind for s in train if s.category == "single")
    train_combos = {(s.objects[0].shape, s.relation[1], s.objects[1].shape) for s in train if s.relation}
    assert not set(info.held_combos) & train_combos
    held_spatial = [s for s in held if s.relation]
    unseen = [s for s in held_spatial if any(o.kind in info.held_kinds for o in s.objects)
              or (s.objects[0].shape, s.relation[1], s.objects[1].shape) in info.held_combos]
    assert len(unseen) == 30 and len(held_spatial) == 40  # 3/4 unseen, 1/4 seen combinations
    assert {s.relation[1] for s in train if s.relation} == set(RELATIONS)


def test_prompt_records_are_the_split():
    train, held = make_split(0)
    recs = prompt_records(0, "heldout")
    assert [parse_prompt(r.text) for r in recs] == held and [r.category for r in recs] == [s.category for s in held]
    assert len({r.id for r in prompt_records(0, "train")}) == len(train)
    assert prompt_records(3, "train") != prompt_records(0, "train")  # the split seed is the one source
    with pytest.raises(ValueError, match="train"):
        prompt_records(0, "test")


# ----- geometry and rendering -----------------------------------------------------------------


def test_relation_holds_hand_computed():
    assert relation_holds("left of", (5, 10), (15, 11), 4)
    assert not relation_holds("left of", (5, 10), (8, 10), 4)  # dx 3 < margin
    assert not relation_holds("left of", (5, 10), (15, 25), 4)  # vertical offset dominates
    assert relation_holds("right of", (15, 10), (5, 10), 4)
    assert relation_holds("above", (10, 2), (10, 20), 4) and relation_holds("below", (10, 20), (10, 2), 4)
    with pytest.raises(ValueError):
        relation_holds("near", (0, 0), (1, 1), 1)


def test_shape_masks_hand_computed():
    sq = shape_mask("square", 4.0, 4.0, 2.0, 8)
    assert sq.sum() == 16 and sq[2:6, 2:6].all()
    tri = shape_mask("triangle", 4.0, 4.0, 2.0, 8)
    assert tri[5].sum() > tri[2].sum()  # wider at the base (apex up)
    circ = shape_mask("circle", 4.0, 4.0, 2.0, 8)
    assert circ.sum() == 12 and circ[3, 3] and not circ[2, 2]


def test_connected_components_hand_computed():
    m = np.array([[1, 1, 0, 0, 1],
                  [0, 1, 0, 1, 1],
                  [1, 0, 0, 0, 0],
                  [1, 0, 1, 1, 0]], dtype=bool)
    lab, n = connected_components(m, 4)
    assert n == 4
    assert lab[0, 0] == lab[1, 1] == 1 and lab[0, 4] == lab[1, 3] == 2 and lab[2, 0] == lab[3, 0] == 3
    assert lab[3, 2] == lab[3, 3] == 4 and (lab[~m] == 0).all()
    lab8, n8 = connected_components(m, 8)
    assert n8 == 3 and lab8[2, 0] == lab8[0, 0]


def test_render_properties(renders):
    specs, imgs = renders
    for s, img in zip(specs, imgs, strict=True):
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        colors = {tuple(int(v) for v in px) for px in np.unique(img.reshape(-1, 3), axis=0)} - {(255, 255, 255)}
        assert colors == {COLORS[o.color] for o in s.objects}
        if s.relation is not None:  # ground truth keeps the relation with the renderer's margin size / 6
            d = {det.color: det.centroid for det in detect(img)}
            a, b = s.objects
            assert relation_holds(s.relation[1], d[a.color], d[b.color], 32 / 6.0 - 1e-6)
    a = render(specs[0], 32, np.random.default_rng(3))
    assert np.array_equal(a, render(specs[0], 32, np.random.default_rng(3)))


# ----- evaluator ----------------------------------------------------------------------------


def test_pixel_colors_and_detect_hand_made():
    img = np.full((16, 16, 3), 255, dtype=np.uint8)
    img[2:8, 2:8] = COLORS["red"]
    img[10:14, 10:14] = (128, 128, 128)  # grey: not in the palette
    cmap = pixel_colors(img)
    assert (cmap[2:8, 2:8] == 1).all() and (cmap[0] == 0).all() and (cmap[10:14, 10:14] == -1).all()
    dets = detect(img)
    assert len(dets) == 1
    d = dets[0]
    assert (d.shape, d.color, d.box, d.area) == ("square", "red", (2, 2, 8, 8), 36)
    assert d.centroid == (5.0, 5.0)


def test_classify_shape_on_exact_masks_and_blobs():
    for shape in SHAPES:
        assert classify_shape(shape_mask(shape, 16.0, 16.0, 5.0, 32)) == shape
    bar = np.zeros((32, 32), bool)
    bar[10:13, 4:28] = True
    assert classify_shape(bar) == "other"
    ring = shape_mask("circle", 16.0, 16.0, 8.0, 32) & ~shape_mask("circle", 16.0, 16.0, 5.0, 32)
    assert classify_shape(ring) == "other"


def test_evaluator_agrees_with_renderer(renders):
    specs, imgs = renders
    acc = accuracy(imgs, specs)
    assert acc["overall"] == 1.0 and acc["n"] == 200
    assert set(acc) >= {"single", "counting", "color_binding", "spatial"}


def test_evaluator_robust_to_blur_and_noise(renders):
    specs, imgs = renders
    rng = np.random.default_rng(0)
    assert accuracy([blur3(i) for i in imgs], specs)["overall"] >= 0.99
    assert accuracy([noisy(i, rng, 12.0) for i in imgs], specs)["overall"] >= 0.99
    assert accuracy([noisy(blur3(i), rng, 8.0) for i in imgs], specs)["overall"] >= 0.95


def test_evaluator_rejects_wrong_images():
    rng = np.random.default_rng(1)
    spec = parse_prompt("a red circle to the left of a blue square")
    assert check(render(spec, 32, rng), spec)["correct"]
    swapped = render(parse_prompt("a red circle to the right of a blue square"), 32, rng)
    res = check(swapped, spec)
    assert res["counts_ok"] and res["relation_ok"] is False and not res["correct"]
    recolored = render(parse_prompt("a green circle to the left of a blue square"), 32, rng)
    res = check(recolored, spec)
    assert not res["correct"] and res["missing"] == ["red circle"]
    two = check(render(parse_prompt("two red circles"), 32, rng), parse_prompt("three red circles"))
    assert two["counts"] == {"red circle": (2, 3)} and not two["correct"]
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert accuracy([blank], [parse_prompt("a red circle")]) == {"overall": 0.0, "n": 1.0, "single": 0.0}
