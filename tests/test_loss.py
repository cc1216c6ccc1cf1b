"""SRUM loss, rectified-flow helpers and the timestep sampler, on tiny tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.loss import (
    LossParts,
    exact_fit_accuracy,
    rf_interpolate,
    rf_target,
    sample_loss_weight,
    sample_timesteps,
    srum_loss,
)


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# ---------------------------------------------------------------- rectified flow


def test_rf_interpolate_endpoints_and_midpoint() -> None:
    x0, noise = _rand(2, 3, 4, 4, seed=1), _rand(2, 3, 4, 4, seed=2)
    torch.testing.assert_close(rf_interpolate(x0, noise, 0.0), x0)
    torch.testing.assert_close(rf_interpolate(x0, noise, 1.0), noise)
    torch.testing.assert_close(rf_interpolate(x0, noise, torch.tensor([0.0, 1.0]))[0], x0[0])
    torch.testing.assert_close(rf_interpolate(x0, noise, torch.tensor([0.0, 1.0]))[1], noise[1])
    mid = rf_interpolate(x0, noise, torch.tensor([0.25, 0.5]))
    torch.testing.assert_close(mid[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(mid[1], 0.5 * x0[1] + 0.5 * noise[1])


def test_rf_target_is_time_derivative_of_interpolation() -> None:
    x0, noise = _rand(3, 2, 2, 2, seed=3), _rand(3, 2, 2, 2, seed=4)
    t = torch.tensor([0.1, 0.5, 0.9])
    _, dxdt = torch.autograd.functional.jvp(lambda tt: rf_interpolate(x0, noise, tt), (t,), (torch.ones(3),))
    torch.testing.assert_close(dxdt, rf_target(x0, noise))
    torch.testing.assert_close(rf_target(x0, noise), noise - x0)


def test_rf_shape_errors() -> None:
    with pytest.raises(ValueError, match=r"\[2\]"):
        rf_interpolate(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="noise shape"):
        rf_target(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3))


# ---------------------------------------------------------------- timesteps


def test_sample_timesteps_range_dtype_and_determinism() -> None:
    a = sample_timesteps(4096, generator=torch.Generator().manual_seed(7))
    b = sample_timesteps(4096, generator=torch.Generator().manual_seed(7))
    c = sample_timesteps(4096, generator=torch.Generator().manual_seed(8))
    assert a.shape == (4096,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a > 0).all() and (a < 1).all()
    assert a.median().item() == pytest.approx(0.5, abs=0.03)  # sigmoid(N(0,1)) has median 0.5


def test_sample_timesteps_shift_formula_and_median() -> None:
    g1, g4 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    u = sample_timesteps(4096, shift=1.0, generator=g1)
    t = sample_timesteps(4096, shift=4.0, generator=g4)
    torch.testing.assert_close(t, (4 * u / (1 + 3 * u)).clamp(1e-6, 1 - 1e-6), rtol=1e-5, atol=1e-6)
    # median maps through the monotone shift: 4*0.5/(1+3*0.5) = 0.8
    assert t.median().item() == pytest.approx(0.8, abs=0.03)
    assert t.median() > u.median()
    assert (t > 0).all() and (t < 1).all()


def test_sample_timesteps_extreme_logits_stay_inside_open_interval() -> None:
    t = sample_timesteps(2000, logit_std=60.0, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert (t > 0).all() and (t < 1).all()
    assert sample_timesteps(0).shape == (0,)
    with pytest.raises(ValueError, match="shift"):
        sample_timesteps(3, shift=0.0)
    with pytest.raises(ValueError, match="logit_std"):
        sample_timesteps(3, logit_std=-1.0)


def test_sample_timesteps_logit_mean_moves_distribution() -> None:
    t = sample_timesteps(4096, logit_mean=1.0, logit_std=0.0)
    torch.testing.assert_close(t, torch.full((4096,), torch.sigmoid(torch.tensor(1.0)).item()))


# ---------------------------------------------------------------- srum_loss: hand-computed values


def test_srum_loss_hand_computed() -> None:
    # B=1, C=1, 1x2 pixels; target = noise - x0 = [1, -1]; v = [3, 0] -> err = [4, 1]
    noise = torch.tensor([[[[1.0, 0.0]]]])
    x0 = torch.tensor([[[[0.0, 1.0]]]])
    v = torch.tensor([[[[3.0, 0.0]]]])
    R = torch.tensor([[[1.0, -1.0]]])
    out = srum_loss(v, noise, x0, R, alpha=0.5, lambda_c=0.5, weight_floor=None)
    assert isinstance(out, LossParts)
    # aR = [0.5, -0.5]; w = [1.0, 0.0]; total = (4*1 + 1*0)/2 = 2
    assert out.total.item() == pytest.approx(2.0)
    assert out.l_r.item() == pytest.approx((0.5 * 4 - 0.5 * 1) / 2)
    assert out.l_ref.item() == pytest.approx(2.5)
    assert out.total.item() == pytest.approx(out.l_r.item() + 0.5 * out.l_ref.item())


def test_reference_constraint_holds_the_velocity_to_the_reference() -> None:
    # target = [1, -1]; v = [3, 0] -> err = [4, 1]; v_ref = [1, 2] -> (v - v_ref)^2 = [4, 4]
    noise, x0 = torch.tensor([[[[1.0, 0.0]]]]), torch.tensor([[[[0.0, 1.0]]]])
    v = torch.tensor([[[[3.0, 0.0]]]], requires_grad=True)
    v_ref = torch.tensor([[[[1.0, 2.0]]]])
    R = torch.tensor([[[1.0, -1.0]]])
    out = srum_loss(v, noise, x0, R, alpha=0.5, lambda_c=0.5, v_ref=v_ref)
    # aR = [0.5, -0.5] floored at 0 -> reward part (0.5 * 4 + 0) / 2 = 1; anchor mean 4 -> total 1 + 0.5 * 4
    assert out.total.item() == pytest.approx(3.0)
    assert out.l_ref.item() == pytest.approx(4.0) and out.l_r.item() == pytest.approx((2.0 - 0.5) / 2)
    out.total.backward()
    # d/dv: reward 0.5 * 2 * (v - target) / 2 on pixel 0; anchor 0.5 * 2 * (v - v_ref) / 2 on both pixels
    assert v.grad.flatten().tolist() == pytest.approx([0.5 * 2 + 0.5 * 2 / 2 * 2, 0.5 * (0.0 - 2.0)])
    # at v == v_ref the constraint vanishes: only the reward pulls
    at_ref = srum_loss(v_ref, noise, x0, R, alpha=0.5, lambda_c=0.5, v_ref=v_ref)
    assert at_ref.l_ref.item() == 0.0
    with pytest.raises(ValueError, match="v_ref shape"):
        srum_loss(v, noise, x0, R, alpha=0.5, v_ref=torch.zeros(1, 1, 1, 3))


def test_floor_binds_only_where_weight_negative() -> None:
    noise = torch.tensor([[[[1.0, 0.0]]]])
    x0 = torch.zeros(1, 1, 1, 2)
    v = torch.tensor([[[[3.0, 2.0]]]])  # err = [4, 4]
    R = torch.tensor([[[1.0, -1.0]]])
    # alpha=1: w = [1.5, -0.5] -> floored [1.5, 0] -> total 3; unfloored (6 - 2)/2 = 2
    floored = srum_loss(v, noise, x0, R, alpha=1.0, lambda_c=0.5)
    assert floored.total.item() == pytest.approx(3.0)
    raw = srum_loss(v, noise, x0, R, alpha=1.0, lambda_c=0.5, weight_floor=None)
    assert raw.total.item() == pytest.approx(2.0)
    assert floored.l_r.item() == raw.l_r.item() == pytest.approx(0.0)
    high = srum_loss(v, noise, x0, R, alpha=1.0, lambda_c=0.5, weight_floor=0.25)
    assert high.total.item() == pytest.approx((1.5 * 4 + 0.25 * 4) / 2)


def test_floor_none_allows_negative_total() -> None:
    noise, x0 = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    v = torch.full((2, 3, 2, 2), 2.0)  # err = 4 everywhere
    R = -torch.ones(2, 2, 2)
    out = srum_loss(v, noise, x0, R, alpha=torch.ones(2), lambda_c=0.5, weight_floor=None)
    assert out.total.item() == pytest.approx(-0.5 * 4)
    assert srum_loss(v, noise, x0, R, alpha=torch.ones(2), lambda_c=0.5).total.item() == 0.0


def test_lambda_zero_and_unit_map_is_alpha_weighted_flow_matching_mse() -> None:
    B, C, h, w = 3, 4, 5, 6
    v, noise, x0 = _rand(B, C, h, w, seed=10), _rand(B, C, h, w, seed=11), _rand(B, C, h, w, seed=12)
    alpha = torch.tensor([0.2, 0.9, 0.55])
    out = srum_loss(v, noise, x0, torch.ones(B, h, w), alpha, lambda_c=0.0)
    per_sample_mse = [((v[i] - (noise[i] - x0[i])) ** 2).mean() for i in range(B)]
    expected = sum(alpha[i] * per_sample_mse[i] for i in range(B)) / B
    assert out.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.l_r.item() == pytest.approx(expected.item(), rel=1e-6)


def test_total_equals_lr_plus_lambda_lref_for_official_maps() -> None:
    B, C, h, w = 2, 3, 4, 4
    v, noise, x0 = _rand(B, C, h, w, seed=20), _rand(B, C, h, w, seed=21), _rand(B, C, h, w, seed=22)
    R = torch.rand(B, h, w, generator=torch.Generator().manual_seed(23))  # official: R in [0, 1]
    out = srum_loss(v, noise, x0, R, torch.tensor([0.3, 0.7]), lambda_c=0.1)
    assert out.total.item() == pytest.approx(out.l_r.item() + 0.1 * out.l_ref.item(), rel=1e-6)


def test_three_and_four_dim_maps_agree_and_alpha_float_equals_tensor() -> None:
    v, noise, x0 = _rand(2, 3, 4, 5, seed=30), _rand(2, 3, 4, 5, seed=31), _rand(2, 3, 4, 5, seed=32)
    R = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(33)) * 2 - 1
    a = srum_loss(v, noise, x0, R, 0.7)
    b = srum_loss(v, noise, x0, R.unsqueeze(1), torch.tensor([0.7, 0.7]))
    c = srum_loss(v, noise, x0, R, torch.tensor(0.7))
    for x, y in ((a, b), (a, c)):
        assert torch.equal(x.total, y.total) and torch.equal(x.l_r, y.l_r) and torch.equal(x.l_ref, y.l_ref)


def test_map_broadcast_over_channels() -> None:
    # channel 0 and channel 1 have identical errors, so the loss equals the single-channel loss
    v1, n1, x1 = _rand(2, 1, 3, 3, seed=40), _rand(2, 1, 3, 3, seed=41), _rand(2, 1, 3, 3, seed=42)
    R = torch.rand(2, 3, 3, generator=torch.Generator().manual_seed(43))
    one = srum_loss(v1, n1, x1, R, 0.5)
    two = srum_loss(v1.repeat(1, 2, 1, 1), n1.repeat(1, 2, 1, 1), x1.repeat(1, 2, 1, 1), R, 0.5)
    assert two.total.item() == pytest.approx(one.total.item(), rel=1e-6)


@pytest.mark.parametrize(
    "bad_map", [torch.zeros(2, 4, 4), torch.zeros(3, 4, 5), torch.zeros(2, 3, 4, 5), torch.zeros(4, 5)]
)
def test_weight_map_shape_mismatch_names_both_shapes(bad_map: torch.Tensor) -> None:
    v = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError) as info:
        srum_loss(v, v, v, bad_map, 1.0)
    msg = str(info.value)
    assert str(list(bad_map.shape)) in msg and "[2, 3, 4, 5]" in msg


def test_other_argument_errors() -> None:
    v = torch.zeros(2, 3, 4, 5)
    with pytest.raises(ValueError, match="share one"):
        srum_loss(v, torch.zeros(2, 3, 4, 4), v, torch.zeros(2, 4, 5), 1.0)
    with pytest.raises(ValueError, match="alpha"):
        srum_loss(v, v, v, torch.zeros(2, 4, 5), torch.ones(3))
    with pytest.raises(ValueError, match="lambda_c"):
        srum_loss(v, v, v, torch.zeros(2, 4, 5), 1.0, lambda_c=-0.1)


# ---------------------------------------------------------------- gradients, dtypes, bounds


def test_positive_weight_gradient_step_moves_v_toward_target() -> None:
    noise, x0 = _rand(2, 3, 4, 4, seed=50), _rand(2, 3, 4, 4, seed=51)
    target = noise - x0
    v = _rand(2, 3, 4, 4, seed=52).requires_grad_(True)
    R = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(53)) * 2 - 1
    out = srum_loss(v, noise, x0, R, torch.tensor([0.8, 0.4]), lambda_c=0.5)
    out.total.backward()
    assert v.grad is not None
    w = (torch.tensor([0.8, 0.4]).view(2, 1, 1, 1) * R.unsqueeze(1) + 0.5).clamp(min=0)
    # analytic gradient: 2 * w * (v - target) / numel
    torch.testing.assert_close(v.grad, 2 * w * (v.detach() - target) / v.numel())
    with torch.no_grad():
        stepped = v - 10.0 * v.grad
    before = (v.detach() - target).abs()
    after = (stepped - target).abs()
    pos = (w > 0).expand_as(v)
    assert (after[pos] < before[pos]).all()
    assert (after.sum() < before.sum()).item()


def test_bf16_inputs_give_float32_loss_and_grad_to_bf16() -> None:
    v32, noise, x0 = _rand(2, 3, 4, 4, seed=60), _rand(2, 3, 4, 4, seed=61), _rand(2, 3, 4, 4, seed=62)
    R = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(63))
    v = v32.to(torch.bfloat16).requires_grad_(True)
    out = srum_loss(v, noise.bfloat16(), x0.bfloat16(), R.bfloat16(), torch.tensor([0.5, 0.5]).bfloat16())
    assert out.total.dtype == out.l_r.dtype == out.l_ref.dtype == torch.float32
    ref = srum_loss(
        v.detach().float(), noise.bfloat16().float(), x0.bfloat16().float(), R.bfloat16().float(), 0.5
    )
    assert out.total.item() == pytest.approx(ref.total.item(), rel=1e-6)
    out.total.backward()
    assert v.grad is not None and v.grad.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = srum_loss(v, noise, x0, R, 0.5)
    assert auto.total.dtype == torch.float32


def test_logging_parts_detached_and_maps_not_differentiated() -> None:
    v = _rand(1, 2, 2, 2, seed=70).requires_grad_(True)
    R = torch.rand(1, 2, 2, requires_grad=True)
    alpha = torch.tensor([0.5], requires_grad=True)
    out = srum_loss(v, torch.zeros_like(v), torch.zeros_like(v), R, alpha)
    assert out.total.requires_grad and not out.l_r.requires_grad and not out.l_ref.requires_grad
    out.total.backward()
    assert R.grad is None and alpha.grad is None


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3),
    C=st.integers(1, 3),
    h=st.integers(1, 5),
    w=st.integers(1, 5),
    lambda_c=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_default_floor_keeps_loss_nonnegative(
    seed: int, B: int, C: int, h: int, w: int, lambda_c: float, scale: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, C, h, w, generator=g) * scale
    noise, x0 = torch.randn(B, C, h, w, generator=g), torch.randn(B, C, h, w, generator=g)
    R = torch.rand(B, h, w, generator=g) * 2 - 1  # signed maps in [-1, 1]
    R[..., 0] = -1.0  # always include the worst case
    alpha = torch.rand(B, generator=g)
    alpha[0] = 1.0
    out = srum_loss(v, noise, x0, R, alpha, lambda_c=lambda_c)
    assert torch.isfinite(out.total) and out.total.item() >= 0.0


def test_exact_fit_accuracy_is_the_weighted_share_of_correct_samples() -> None:
    # the arithmetic: weight 0.94 on correct samples, 0.60 on wrong ones, a pool at 50 % -> 61 %
    correct = [True] * 50 + [False] * 50
    weights = [0.94] * 50 + [0.60] * 50
    assert exact_fit_accuracy(correct, weights) == pytest.approx(0.94 / 1.54)
    assert exact_fit_accuracy([True, False], [1.0, 1.0]) == 0.5  # uniform weights (self-SFT): no tilt
    with pytest.raises(ValueError):
        exact_fit_accuracy([True], [0.0])
    with pytest.raises(ValueError):
        exact_fit_accuracy([True, False], [1.0])


def test_sample_loss_weight_follows_the_constraint_and_the_floor() -> None:
    assert sample_loss_weight(0.5, 0.8, 0.5) == pytest.approx(0.9)
    assert sample_loss_weight(0.5, 0.8, 0.5, "reference") == pytest.approx(0.4)
    assert sample_loss_weight(1.0, -1.0, 0.5) == 0.0  # floored, as the loss floors it
    assert sample_loss_weight(1.0, -1.0, 0.5, weight_floor=None) == -0.5
    with pytest.raises(ValueError, match="constraint"):
        sample_loss_weight(1.0, 1.0, 0.5, "kl")

