"""EMA arithmetic against a hand-written loop of the reference rule, and swap-in/out."""

import pytest
import torch

from megatron_bd3.training.ema import ExponentialMovingAverage


def test_ema_matches_a_hand_loop_with_the_warmup_decay():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = ExponentialMovingAverage(model.named_parameters(), decay=0.9999)
    shadow = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    decays = []
    for n_update in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        decays.append(ema.update())
        d = min(0.9999, (1 + n_update) / (10 + n_update))  # n counts this update
        for name, p in model.named_parameters():
            shadow[name] = d * shadow[name] + (1 - d) * p.detach().double()
    assert decays[0] == pytest.approx(2 / 11)
    assert decays[-1] == pytest.approx(30 / 39)  # n = 29
    for name, value in shadow.items():
        torch.testing.assert_close(ema.shadow[name].double(), value, rtol=1e-6, atol=1e-6)


def test_decay_caps_at_the_configured_value():
    p = torch.nn.Parameter(torch.zeros(1))
    ema = ExponentialMovingAverage([("p", p)], decay=0.5)
    decays = [ema.update() for _ in range(12)]
    assert decays[:8] == pytest.approx([(1 + n) / (10 + n) for n in range(1, 9)])  # below 0.5
    assert decays[9:] == [0.5, 0.5, 0.5]  # (1 + n) / (10 + n) >= 0.5 from n = 9 on


def test_swap_in_restores_training_weights_and_state_dict_round_trips():
    model = torch.nn.Linear(2, 2)
    ema = ExponentialMovingAverage(model.named_parameters(), decay=0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update()
    trained = model.weight.detach().clone()
    with ema.swap_in():
        torch.testing.assert_close(model.weight.detach(), ema.shadow["weight"])
    torch.testing.assert_close(model.weight.detach(), trained)

    other = ExponentialMovingAverage(torch.nn.Linear(2, 2).named_parameters(), decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    torch.testing.assert_close(other.shadow["weight"], ema.shadow["weight"])
    wrong = ExponentialMovingAverage(torch.nn.Linear(3, 2).named_parameters(), decay=0.9)
    with pytest.raises(ValueError, match="shape"):
        wrong.load_state_dict(ema.state_dict())


def test_grouped_update_equals_the_per_parameter_formula_exactly():
    """The multi-tensor update over groups (more parameters than one group; fp32 and bf16
    weights) gives bit-identical shadows to shadow -= (1 - d) * (shadow - p), one by one."""
    from megatron_bd3.training.ema import ExponentialMovingAverage, warmup_decay

    generator = torch.Generator().manual_seed(0)
    params = [
        (f"p{i}", torch.nn.Parameter(torch.randn(3 + i % 5, 4, generator=generator).to(
            torch.bfloat16 if i % 3 == 0 else torch.float32)))
        for i in range(70)
    ]
    ema = ExponentialMovingAverage(params, decay=0.99)
    expected = {name: p.detach().float().clone() for name, p in params}
    for update in range(1, 4):
        with torch.no_grad():
            for _, p in params:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
        ema.update()
        d = warmup_decay(0.99, update)
        for name, p in params:
            expected[name].sub_((1.0 - d) * (expected[name] - p.detach().float()))
    for name, _ in params:
        assert torch.equal(ema.shadow[name], expected[name]), name
