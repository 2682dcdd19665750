"""LR schedule: linear warm-up from 0, then constant or cosine, as a pure function of the step."""

import math

import pytest

from megatron_bd3.training.lr_schedule import learning_rate


def test_warmup_then_constant_matches_lambda_lr_of_the_reference():
    # transformers.get_constant_schedule_with_warmup: factor(step) = step / warmup below warmup
    peak, warm = 3e-4, 2500
    for step in (0, 1, 1249, 2499, 2500, 10_000, 1_000_000):
        expected = peak * step / warm if step < warm else peak
        assert learning_rate(step, peak_lr=peak, warmup_steps=warm) == pytest.approx(expected)
    assert learning_rate(0, peak_lr=peak, warmup_steps=warm) == 0.0


def test_cosine_decays_from_peak_to_min_and_stays():
    peak, low, warm, decay = 1.0, 0.1, 10, 100
    values = [
        learning_rate(
            s, peak_lr=peak, warmup_steps=warm, decay="cosine", decay_steps=decay, min_lr=low
        )
        for s in range(0, 130)
    ]
    assert values[warm] == pytest.approx(peak)
    assert values[warm + decay // 2] == pytest.approx(low + 0.5 * (peak - low))
    assert values[warm + decay] == pytest.approx(low)
    assert values[125] == pytest.approx(low)
    # brute-force: the textbook cosine at each step
    for s in range(warm, warm + decay):
        ref = low + (peak - low) * (1 + math.cos(math.pi * (s - warm) / decay)) / 2
        assert values[s] == pytest.approx(ref)
    assert all(a >= b - 1e-12 for a, b in zip(values[warm:], values[warm + 1 :], strict=False))


def test_no_warmup_and_bad_arguments():
    assert learning_rate(0, peak_lr=2.0, warmup_steps=0) == 2.0
    with pytest.raises(ValueError, match="decay_steps"):
        learning_rate(5, peak_lr=1.0, warmup_steps=0, decay="cosine")
    with pytest.raises(ValueError, match="unknown LR decay"):
        learning_rate(5, peak_lr=1.0, warmup_steps=0, decay="linear")
