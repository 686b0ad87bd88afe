"""Fixtures shared by the check tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Tiny tensors: on a busy 2-core machine, thread hand-offs cost more than the work."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
