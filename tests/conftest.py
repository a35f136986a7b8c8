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


TEXT_LENGTH = 8


@pytest.fixture(scope="session")
def make_dataset():
    """make_dataset(folder, seed=0, buckets=((4, 4), (4, 6)), per_bucket=3): a random
    encoded dataset for TINY, latent sizes in latent pixels."""
    import torch

    from fluxtrain.dataset import EncodedDataset, EncodedDatasetWriter

    def make(folder, seed=0, buckets=((4, 4), (4, 6)), per_bucket=3) -> EncodedDataset:
        g = torch.Generator().manual_seed(seed)
        with EncodedDatasetWriter(folder, resolution=64,
                                  encoders={"vae": "random", "text": "random"}) as w:
            w.set_empty_caption(torch.randn(TEXT_LENGTH, TINY.context_in_dim, generator=g),
                                torch.randn(TINY.vec_in_dim, generator=g))
            for h, wd in buckets:
                for i in range(per_bucket):
                    w.add(torch.randn(16, h, wd, generator=g),
                          torch.randn(TEXT_LENGTH, TINY.context_in_dim, generator=g),
                          torch.randn(TINY.vec_in_dim, generator=g), f"sample {h}x{wd} {i}")
        return EncodedDataset.open(folder)

    return make


@pytest.fixture(autouse=True, scope="session")
def _one_cpu_thread():
    """The test models are tiny: one thread is fastest, and it keeps the suite from
    oversubscribing a 2-core machine when other work runs beside it."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def umask_027():
    """A umask under which files are 0640 and folders 0750: not what mkstemp's 0600 gives.
    Yields check(folder) -> the modes found below folder that differ from those."""
    import os
    import stat
    from pathlib import Path

    def check(folder) -> list[str]:
        wrong = []
        for path in [Path(folder), *Path(folder).rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode != (0o750 if path.is_dir() else 0o640):
                wrong.append(f"{path.relative_to(folder)}: {oct(mode)}")
        return wrong

    old = os.umask(0o027)
    try:
        yield check
    finally:
        os.umask(old)
