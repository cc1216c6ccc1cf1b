"""Reward maps: hand-computed maps for both semantics, box handling, ablations and resizing."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from core.config import RewardConfig
from core.records import DropReason, Region
from rewards.reward_map import (
    build_reward_map,
    global_to_alpha,
    resize_map,
)


def replace(cfg: RewardConfig, **changes) -> RewardConfig:
    """``cfg`` with ``changes``, validated like a loaded config (bad combinations raise)."""
    return RewardConfig(**{**cfg.model_dump(), **changes})


OFFICIAL = RewardConfig()
SIGNED = RewardConfig(semantics="signed")


def T(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def assert_map(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- global_to_alpha


@pytest.mark.parametrize(
    ("g", "alpha"), [(-1.0, 0.0), (-0.5, 0.25), (0.0, 0.5), (0.6, 0.8), (1.0, 1.0), (3.0, 1.0), (-2.0, 0.0)]
)
def test_global_to_alpha(g: float, alpha: float) -> None:
    assert global_to_alpha(g) == pytest.approx(alpha, abs=1e-12)


def test_global_to_alpha_rejects_nan() -> None:
    with pytest.raises(ValueError, match="finite"):
        global_to_alpha(math.nan)


# ---------------------------------------------------------------- official semantics


def test_official_two_overlapping_boxes_max_and_negative_noop() -> None:
    regions = [
        Region(box=(0, 0, 4, 4), score=0.6),  # (0.6+1)/2 = 0.8
        Region(box=(2, 2, 6, 6), score=0.2),  # 0.6; overlap [2:4, 2:4] keeps max 0.8
        Region(box=(4, 0, 6, 2), score=-0.8),  # 0.1 < 0.5: background untouched
    ]
    m = build_reward_map(regions, 0.6, 6, 6, OFFICIAL)
    expected = T(
        [
            [0.8, 0.8, 0.8, 0.8, 0.5, 0.5],
            [0.8, 0.8, 0.8, 0.8, 0.5, 0.5],
            [0.8, 0.8, 0.8, 0.8, 0.6, 0.6],
            [0.8, 0.8, 0.8, 0.8, 0.6, 0.6],
            [0.5, 0.5, 0.6, 0.6, 0.6, 0.6],
            [0.5, 0.5, 0.6, 0.6, 0.6, 0.6],
        ]
    )
    assert_map(m.R, expected)
    assert m.alpha == pytest.approx(0.8)
    assert not m.drop and m.drop_reason is None and m.skipped_boxes == 0
    assert m.global_score == pytest.approx(0.6)
    assert_map(m.weight(), expected * 0.8)


def test_official_negative_region_alone_leaves_background_untouched() -> None:
    m = build_reward_map([Region(box=(1, 1, 3, 3), score=-1.0)], 0.2, 4, 4, OFFICIAL)
    assert_map(m.R, torch.full((4, 4), 0.5))
    assert m.skipped_boxes == 0  # it was a valid box, just a no-op


def test_official_negative_region_does_not_lower_positive_overlap() -> None:
    regions = [Region(box=(0, 0, 2, 2), score=1.0), Region(box=(1, 1, 3, 3), score=-0.5)]
    m = build_reward_map(regions, 1.0, 4, 4, OFFICIAL)
    expected = T(
        [
            [1.0, 1.0, 0.5, 0.5],
            [1.0, 1.0, 0.5, 0.5],
            [0.5, 0.5, 0.5, 0.5],
            [0.5, 0.5, 0.5, 0.5],
        ]
    )
    assert_map(m.R, expected)


@pytest.mark.parametrize("g", [-0.6, 0.4, 1.0])
def test_official_no_regions_is_half_times_alpha(g: float) -> None:
    m = build_reward_map([], g, 4, 5, OFFICIAL)
    assert_map(m.R, torch.full((4, 5), 0.5))
    assert_map(m.weight(), torch.full((4, 5), 0.5 * (g + 1) / 2))
    assert not m.drop


def test_official_drops_at_global_zero_and_none() -> None:
    m0 = build_reward_map([Region(box=(0, 0, 2, 2), score=0.5)], 0.0, 4, 4, OFFICIAL)
    assert m0.drop and m0.drop_reason == DropReason.GLOBAL_SCORE_ZERO and m0.alpha == 0.5
    mneg0 = build_reward_map([], -0.0, 4, 4, OFFICIAL)
    assert mneg0.drop_reason == DropReason.GLOBAL_SCORE_ZERO
    mn = build_reward_map([Region(box=(0, 0, 2, 2), score=0.5)], None, 4, 4, OFFICIAL)
    assert mn.drop and mn.drop_reason == DropReason.NO_GLOBAL_SCORE and mn.alpha == 0.0 and mn.global_score is None
    mnan = build_reward_map([], math.nan, 4, 4, OFFICIAL)
    assert mnan.drop and mnan.drop_reason == DropReason.NO_GLOBAL_SCORE and mnan.global_score is None
    near = build_reward_map([], 1e-9, 4, 4, OFFICIAL)
    assert not near.drop  # only exactly 0 drops


def test_official_rejects_non_max_merge() -> None:
    with pytest.raises(ValueError, match="merge='mean': used only with semantics='signed'"):
        build_reward_map([], 0.5, 4, 4, replace(OFFICIAL, merge="mean"))


def test_global_score_clamped() -> None:
    m = build_reward_map([], 1.7, 2, 2, OFFICIAL)
    assert m.global_score == 1.0 and m.alpha == 1.0


# ---------------------------------------------------------------- signed semantics

# Two overlapping boxes on a 4x4 image: A = [0,0,3,3] (area 9, s=0.8), B = [1,1,3,3] (area 4, s=-0.4).
# Overlap is [1:3, 1:3]; A only covers row 0 and column 0 of [0:3, 0:3]; nothing covers row/col 3.
OVERLAP = [Region(box=(0, 0, 3, 3), score=0.8), Region(box=(1, 1, 3, 3), score=-0.4)]


def _overlap_expected(overlap_value: float, bg: float) -> torch.Tensor:
    a, o = 0.8, overlap_value
    return T([[a, a, a, bg], [a, o, o, bg], [a, o, o, bg], [bg, bg, bg, bg]])


@pytest.mark.parametrize(
    ("merge", "overlap_value"),
    [("max", 0.8), ("min", -0.4), ("mean", (0.8 - 0.4) / 2), ("smallest", -0.4)],
)
def test_signed_merge_rules_on_overlap(merge: str, overlap_value: float) -> None:
    m = build_reward_map(OVERLAP, 0.0, 4, 4, replace(SIGNED, merge=merge))
    assert_map(m.R, _overlap_expected(overlap_value, 0.0))
    assert m.alpha == 0.5 and not m.drop  # g == 0 does not drop in signed mode


def test_signed_smallest_is_order_independent_and_ties_go_to_higher_score() -> None:
    cfg = replace(SIGNED, merge="smallest")
    forward = build_reward_map(OVERLAP, 0.5, 4, 4, cfg).R
    backward = build_reward_map(OVERLAP[::-1], 0.5, 4, 4, cfg).R
    assert_map(forward, backward)
    tie = [Region(box=(0, 0, 2, 2), score=-0.3), Region(box=(1, 1, 3, 3), score=0.7)]  # both area 4
    for regions in (tie, tie[::-1]):
        R = build_reward_map(regions, 0.5, 3, 3, cfg).R
        assert_map(R, T([[-0.3, -0.3, 0.0], [-0.3, 0.7, 0.7], [0.0, 0.7, 0.7]]))


def test_signed_mean_of_three_boxes() -> None:
    regions = [Region(box=(0, 0, 2, 1), score=0.9), Region(box=(1, 0, 2, 1), score=0.3)]
    regions.append(Region(box=(1, 0, 2, 1), score=-0.6))
    m = build_reward_map(regions, 1.0, 1, 3, replace(SIGNED, merge="mean"))
    assert_map(m.R, T([[0.9, 0.2, 0.0]]))


def test_signed_negative_region_lowers_weight_below_background() -> None:
    cfg = replace(SIGNED, background=0.1)
    m = build_reward_map([Region(box=(0, 0, 1, 1), score=-0.6)], 0.6, 2, 2, cfg)
    assert_map(m.R, T([[-0.6, 0.1], [0.1, 0.1]]))
    w = m.weight()
    assert_map(w, T([[-0.48, 0.08], [0.08, 0.08]]))
    assert w[0, 0] < w[1, 1]


def test_signed_background_configurable_and_drop_only_on_none() -> None:
    m = build_reward_map([], 0.2, 2, 3, replace(SIGNED, background=-0.25))
    assert_map(m.R, torch.full((2, 3), -0.25))
    assert m.alpha == pytest.approx(0.6) and not m.drop
    mn = build_reward_map([], None, 2, 3, SIGNED)
    assert mn.drop and mn.drop_reason == DropReason.NO_GLOBAL_SCORE
    with pytest.raises(ValueError, match="background"):
        build_reward_map([], 0.2, 2, 3, replace(SIGNED, background=1.5))


def test_region_scores_clamped() -> None:
    m = build_reward_map([Region(box=(0, 0, 1, 1), score=-3.0)], 0.5, 1, 2, SIGNED)
    assert_map(m.R, T([[-1.0, 0.0]]))
    mo = build_reward_map([Region(box=(0, 0, 1, 1), score=2.0)], 0.5, 1, 2, OFFICIAL)
    assert_map(mo.R, T([[1.0, 0.5]]))


# ---------------------------------------------------------------- box handling


def test_boxes_clamped_to_image() -> None:
    m = build_reward_map([Region(box=(-5, -5, 2, 2), score=1.0)], 1.0, 3, 3, SIGNED)
    assert_map(m.R, T([[1, 1, 0], [1, 1, 0], [0, 0, 0]]))
    m2 = build_reward_map([Region(box=(2, 1, 99, 99), score=-1.0)], 1.0, 3, 3, SIGNED)
    assert_map(m2.R, T([[0, 0, 0], [0, 0, -1], [0, 0, -1]]))
    assert m.skipped_boxes == m2.skipped_boxes == 0


def test_float_coordinates_cover_every_touched_pixel() -> None:
    # columns floor(0.5)=0 .. ceil(2.2)-1=2, rows floor(1.0)=1 .. ceil(1.5)-1=1
    m = build_reward_map([Region(box=(0.5, 1.0, 2.2, 1.5), score=0.5)], 1.0, 3, 4, SIGNED)
    assert_map(m.R, T([[0, 0, 0, 0], [0.5, 0.5, 0.5, 0], [0, 0, 0, 0]]))
    # a sliver inside one pixel still covers it
    s = build_reward_map([Region(box=(1.2, 0.1, 1.4, 0.2), score=0.5)], 1.0, 2, 2, SIGNED)
    assert_map(s.R, T([[0, 0.5], [0, 0]]))


@pytest.mark.parametrize(
    "box",
    [
        (2, 0, 2, 3),  # zero width
        (0, 1, 3, 1),  # zero height
        (3, 0, 1, 2),  # inverted x
        (0, 3, 2, 1),  # inverted y
        (math.nan, 0, 2, 2),
        (0, 0, math.inf, 2),
        (0, -math.inf, 2, 2),
        (5, 5, 9, 9),  # wholly outside: zero area after clamp
        (-4, 0, -1, 2),  # wholly left of the image
    ],
)
def test_bad_boxes_skipped_and_counted(box: tuple[float, float, float, float]) -> None:
    regions = [Region(box=box, score=0.9), Region(box=(0, 0, 1, 1), score=0.9)]
    m = build_reward_map(regions, 0.5, 3, 3, SIGNED)
    assert m.skipped_boxes == 1
    assert_map(m.R, T([[0.9, 0, 0], [0, 0, 0], [0, 0, 0]]))


def test_none_and_nan_scores_skipped_and_malformed_duck_regions() -> None:
    @dataclass
    class Duck:
        box: object
        score: float | None

    regions = [
        Region(box=(0, 0, 2, 2), score=None),
        Region(box=(0, 0, 2, 2), score=math.nan),
        Duck(box=(0, 0, 1), score=0.5),
        Duck(box="abcd", score=0.5),
        Duck(box=(1, 1, 2, 2), score=0.5),  # a valid duck-typed region
    ]
    m = build_reward_map(regions, 0.5, 2, 2, OFFICIAL)
    assert m.skipped_boxes == 4
    assert_map(m.R, T([[0.5, 0.5], [0.5, 0.75]]))


def test_bad_image_size_raises() -> None:
    with pytest.raises(ValueError, match="positive integers"):
        build_reward_map([], 0.5, 0, 4, OFFICIAL)


# ---------------------------------------------------------------- ablations


def test_sample_granularity_constant_map_ignores_regions() -> None:
    regions = [Region(box=(0, 0, 2, 2), score=1.0)]
    off = build_reward_map(regions, 0.2, 3, 3, replace(OFFICIAL, granularity="sample"), sample_score=-0.4)
    assert_map(off.R, torch.full((3, 3), 0.3))
    assert off.alpha == pytest.approx(0.6)
    sig = build_reward_map(regions, 0.2, 3, 3, replace(SIGNED, granularity="sample"), sample_score=-0.4)
    assert_map(sig.R, torch.full((3, 3), -0.4))


def test_sample_granularity_falls_back_to_global_then_drops() -> None:
    cfg = replace(SIGNED, granularity="sample")
    m = build_reward_map([], 0.6, 2, 2, cfg, sample_score=None)
    assert_map(m.R, torch.full((2, 2), 0.6))
    nog = build_reward_map([], None, 2, 2, replace(cfg, use_global=False), sample_score=None)
    assert nog.drop and nog.drop_reason == DropReason.NO_SAMPLE_SCORE
    assert_map(nog.R, torch.zeros(2, 2))


def test_binarize_official_and_signed_exact_zero_one() -> None:
    regions = [Region(box=(0, 0, 1, 1), score=0.4), Region(box=(1, 0, 2, 1), score=-0.4)]
    regions.append(Region(box=(2, 0, 3, 1), score=0.0))
    off = build_reward_map(regions, 0.5, 1, 4, replace(OFFICIAL, binarize=True))
    # official R = [0.7, 0.5, 0.5, 0.5] -> > 0.5
    assert_map(off.R, T([[1, 0, 0, 0]]))
    sig = build_reward_map(regions, 0.5, 1, 4, replace(SIGNED, binarize=True, binarize_threshold=0.25))
    # signed R = [0.4, -0.4, 0, 0] -> R01 = [0.7, 0.3, 0.5, 0.5] -> > 0.25
    assert_map(sig.R, T([[1, 1, 1, 1]]))
    sig2 = build_reward_map(regions, 0.5, 1, 4, replace(SIGNED, binarize=True))
    assert_map(sig2.R, T([[1, 0, 0, 0]]))
    assert set(sig2.R.unique().tolist()) <= {0.0, 1.0}


def test_use_global_false_alpha_one_and_no_drop() -> None:
    regions = [Region(box=(0, 0, 1, 1), score=0.6)]
    for g in (0.0, None, -1.0, 0.3):
        m = build_reward_map(regions, g, 2, 2, replace(OFFICIAL, use_global=False))
        assert m.alpha == 1.0 and not m.drop and m.drop_reason is None
        assert_map(m.weight(), T([[0.8, 0.5], [0.5, 0.5]]))


def test_settings_are_validated_where_the_config_is_made() -> None:
    for bad in ({"semantics": "weird"}, {"resize": "nearest"}, {"merge": "min"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            replace(OFFICIAL, **bad)
    m = build_reward_map([Region(box=(0, 0, 1, 1), score=1.0)], 1.0, 2, 2, replace(SIGNED, merge="smallest"))
    assert m.R.shape == (2, 2) and m.R[0, 0] == 1.0 and m.alpha == 1.0


# ---------------------------------------------------------------- resize


def test_area_resize_exact_small_example() -> None:
    R = T([[1, 3, 0, 0], [5, 7, 0, 4], [2, 2, -1, 1], [2, 2, 1, 3]])
    out = resize_map(R, 2, 2, "area")
    assert_map(out, T([[4.0, 1.0], [2.0, 1.0]]))


@pytest.mark.parametrize(
    ("H", "W", "h", "w"), [(64, 64, 8, 8), (48, 32, 6, 4), (12, 18, 12, 6), (9, 9, 3, 1)]
)
def test_area_resize_preserves_mean(H: int, W: int, h: int, w: int) -> None:
    g = torch.Generator().manual_seed(H * W + h)
    R = torch.rand(H, W, generator=g) * 2 - 1
    out = resize_map(R, h, w, "area")
    assert out.shape == (h, w)
    assert out.mean().item() == pytest.approx(R.mean().item(), abs=1e-6)


def test_bilinear_resize_shape_and_range() -> None:
    g = torch.Generator().manual_seed(0)
    R = torch.rand(37, 53, generator=g) * 2 - 1
    for h, w in ((8, 8), (5, 13), (64, 80)):
        out = resize_map(R, h, w, "bilinear")
        assert out.shape == (h, w) and out.dtype == torch.float32
        assert out.min() >= R.min() - 1e-6 and out.max() <= R.max() + 1e-6
    const = resize_map(torch.full((16, 16), 0.3), 4, 4, "bilinear")
    assert_map(const, torch.full((4, 4), 0.3))


def test_resize_batched_identity_and_errors() -> None:
    R = torch.arange(32, dtype=torch.float64).reshape(2, 4, 4)
    out = resize_map(R, 2, 2)
    assert out.shape == (2, 2, 2) and out.dtype == torch.float32
    assert_map(out[1], resize_map(R[1], 2, 2))
    same = resize_map(R[0], 4, 4)
    assert_map(same, R[0].float())
    assert same.data_ptr() != R[0].data_ptr()
    with pytest.raises(ValueError, match="resize mode"):
        resize_map(R[0], 2, 2, "nearest")
    with pytest.raises(ValueError, match="shape"):
        resize_map(torch.zeros(4), 2, 2)
