"""The run-state components: the RNG streams an elastic resume re-derives."""

import random

import numpy as np
import torch

from megatron_bd3.training.state import RNGState


def draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def rederived(seed: int, step: int) -> tuple:
    state = RNGState(seed=seed)
    state.rederive(step)
    torch.manual_seed(12345)  # whatever ran before the first step does not matter
    state.restore()
    return draws()


def test_rederived_streams_are_a_function_of_seed_and_step(single_rank):
    before = torch.get_rng_state()
    try:
        first = rederived(3, 8)
        assert rederived(3, 8) == first
        assert rederived(3, 9) != first and rederived(4, 8) != first
        state = RNGState(seed=3)  # nothing pending: restore changes nothing
        torch.manual_seed(7)
        expected = torch.rand(2)
        torch.manual_seed(7)
        state.restore()
        assert torch.equal(torch.rand(2), expected)
    finally:
        torch.set_rng_state(before)
