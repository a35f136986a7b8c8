"""Fixtures shared by the test files: small random Flux models with the real key layout."""

from __future__ import annotations

import dataclasses

import pytest

from fluxtrain.params import TINY
from fluxtrain.synthetic import random_state_dict

# A second small shape: other hidden size and head count, one block of each kind.
TINY_1x1 = dataclasses.replace(TINY, hidden_size=96, num_heads=3, context_in_dim=40,
                               depth=1, depth_single_blocks=1)


@pytest.fixture(scope="session")
def tiny_sd():
    """Random TINY Flux in BFL keys, float32. Shared: do not modify it."""
    return random_state_dict(TINY, seed=0)
