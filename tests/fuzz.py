"""Seeded random choices for the random tests: each case reproduces from its index.

``PATCHMOSAIC_FUZZ_CASES`` (default 200) sets how many cases the random tests draw; each test
takes a share of it (``cases``), so raising it runs a longer hunt everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def cases(share: int = 1) -> range:
    """Case indices of one random test: ``PATCHMOSAIC_FUZZ_CASES // share``."""
    return range(int(os.environ.get("PATCHMOSAIC_FUZZ_CASES", "200")) // share)


def picker(seed: int) -> tuple[torch.Generator, Callable[[Sequence[T]], T]]:
    """A generator seeded with ``seed`` and ``pick(options)``, one option drawn uniformly from it."""
    g = torch.Generator().manual_seed(seed)

    def pick(options: Sequence[T]) -> T:
        return options[int(torch.randint(len(options), (1,), generator=g))]

    return g, pick
