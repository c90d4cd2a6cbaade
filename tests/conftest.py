import os
import sys
from pathlib import Path

# Triton kernels (optional extra "gpu") run in Triton's CPU interpreter in the tests
# (tests/test_fused_kernel.py). triton.language fixes interpreter vs compiler when
# it is imported, so this must precede every import of triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/reference.py


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test process: the suite runs under pytest-xdist
    with one worker per core, and tiny convolutions are far slower when two
    threads contend for one core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
