"""The evaluation tests use tiny models: one thread avoids OpenMP oversubscription on a shared
2-core machine, as in tests/standalone. Restored after each module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
