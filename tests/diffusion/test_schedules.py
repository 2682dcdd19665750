"""Noise schedules against closed forms and finite-difference derivatives of alpha_t."""

import math

import pytest
import torch

from megatron_bd3.diffusion import (
    ClipRange,
    clip_search_grid,
    get_noise_schedule,
    loss_weight_with_clipping,
)

EPS = 1e-3

# alpha_t written from docs/method.md §2.1 / the reference formulas, independently of the module.
ALPHAS = {
    "linear": lambda t: 1 - t,
    "loglinear": lambda t: 1 - t,
    "cosine": lambda t: (1 - EPS) * torch.cos(t * math.pi / 2),
    "square": lambda t: 1 - t**2,
    "square_root": lambda t: 1 - torch.sqrt(t),
    "log": lambda t: 1 - torch.log(1 + t) / math.log(2),
    "mdlm_loglinear": lambda t: 1 - (1 - EPS) * t,
}
# closed-form weights -alpha'/(1 - alpha)
WEIGHTS = {
    "linear": lambda t: 1 / t,
    "loglinear": lambda t: 1 / t,
    "cosine": lambda t: (
        (1 - EPS)
        * (math.pi / 2)
        * torch.sin(t * math.pi / 2)
        / (1 - (1 - EPS) * torch.cos(t * math.pi / 2))
    ),
    "square": lambda t: 2 / t,
    "square_root": lambda t: 0.5 / t,
    "log": lambda t: 1 / ((1 + t) * torch.log(1 + t)),
    "mdlm_loglinear": lambda t: 1 / t,
}

T_GRID = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(ALPHAS))
def test_move_prob_and_weight_closed_form(name):
    schedule = get_noise_schedule(name)
    alpha = ALPHAS[name](T_GRID)
    torch.testing.assert_close(schedule.move_prob(T_GRID), 1 - alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(schedule.alpha(T_GRID), alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        schedule.loss_weight(T_GRID), WEIGHTS[name](T_GRID), rtol=1e-10, atol=0
    )


@pytest.mark.parametrize("name", sorted(ALPHAS))
def test_weight_is_finite_difference_of_alpha(name):
    schedule = get_noise_schedule(name)
    h = 1e-6
    derivative = (ALPHAS[name](T_GRID + h) - ALPHAS[name](T_GRID - h)) / (2 * h)
    expected = -derivative / (1 - ALPHAS[name](T_GRID))
    torch.testing.assert_close(schedule.loss_weight(T_GRID), expected, rtol=1e-6, atol=0)
    assert (schedule.loss_weight(T_GRID) > 0).all()


def test_linear_move_prob_is_t_exactly():
    t = torch.rand(1000) * 0.999 + 1e-3
    schedule = get_noise_schedule("linear")
    assert torch.equal(schedule.move_prob(t), t)
    assert torch.equal(schedule.loss_weight(t), 1 / t)


def test_mdlm_loss_scale_matches_sigma_formulas():
    t = torch.linspace(1e-3, 1.0, 50, dtype=torch.float64)
    sigma = -torch.log(1 - (1 - EPS) * t)
    dsigma = (1 - EPS) / (1 - (1 - EPS) * t)
    schedule = get_noise_schedule("loglinear", mdlm_loss_scale=True)
    assert schedule.name == "mdlm_loglinear"
    torch.testing.assert_close(schedule.move_prob(t), 1 - torch.exp(-sigma))
    torch.testing.assert_close(schedule.loss_weight(t), dsigma / torch.expm1(sigma))
    with pytest.raises(ValueError, match="mdlm_loss_scale"):
        get_noise_schedule("cosine", mdlm_loss_scale=True)


def test_unknown_schedule_lists_valid_names():
    with pytest.raises(ValueError) as info:
        get_noise_schedule("geometric")
    message = str(info.value)
    assert "geometric" in message
    for name in ("linear", "loglinear", "cosine", "square", "square_root", "log"):
        assert name in message


def test_clip_range_validation():
    assert ClipRange() == ClipRange(1e-3, 1.0)
    assert ClipRange().is_elbo and not ClipRange(0.3, 0.8).is_elbo
    for bad in [(0.5, 0.5), (0.6, 0.4), (-0.1, 0.5), (0.2, 1.1)]:
        with pytest.raises(ValueError, match="eps_min"):
            ClipRange(*bad)


def test_clipped_weight_rule():
    t = torch.tensor([0.6, 0.8, 1.0])
    linear = get_noise_schedule("linear")
    assert torch.equal(loss_weight_with_clipping(linear, t, 0.55), torch.ones(3))
    assert torch.equal(loss_weight_with_clipping(linear, t, 0.5), 1 / t)


def test_clip_search_grid():
    expected = [(1e-3, 1.0)]
    for width in (50, 60, 70, 80, 90):  # hundredths, integer arithmetic
        for start in range(0, 100 - width + 1, 5):
            expected.append((max(start / 100, 1e-3), (start + width) / 100))
    grid = clip_search_grid()
    assert len(grid) == 36 == len(expected)
    assert [(c.eps_min, c.eps_max) for c in grid] == expected
    assert all(c.eps_max <= 1.0 for c in grid)
    assert len(clip_search_grid(widths=(0.5,), delta=0.25)) == 1 + 3
