"""The training side of the patch machines against brute force: patch norms, constant patches,
window reductions, and the views that copy a group's candidates without a gather."""

import pytest
import torch

from patchmosaic.engine import (
    block_views,
    flat_patches,
    patch_sq_norms,
    patch_windows,
    select_blocks,
    window_max,
    window_sums,
)
from patchmosaic.geometry import AxisBlocks, make_geometry


@pytest.mark.parametrize("k", range(1, 20))
def test_window_reductions_equal_a_loop_over_windows(k):
    gen = torch.Generator().manual_seed(k)
    t = torch.randn(3, 23, 2, generator=gen, dtype=torch.float64)
    sums = torch.stack([t[:, i : i + k].sum(1) for i in range(23 - k + 1)], dim=1)
    maxima = torch.stack([t[:, i : i + k].amax(1) for i in range(23 - k + 1)], dim=1)
    torch.testing.assert_close(window_sums(t, k, 1), sums, rtol=1e-13, atol=1e-13)
    assert torch.equal(window_max(t, k, 1), maxima)


def _images(seed: int, n: int = 4, C: int = 2, H: int = 9, W: int = 7) -> torch.Tensor:
    """Random images with constant regions (so that some patches of every size are constant)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, H, W, generator=gen, dtype=torch.float64)
    x[:, :, : H // 2] = 0.0
    x[0] = 0.0
    x[1, 1] = x[1, 0]  # equal channels
    return x


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9])
def test_patch_norms_and_constant_patches_equal_brute_force(padding, k):
    x = _images(k)
    r = k // 2
    patches = patch_windows(x, r, padding)  # [n, C, H, W, k, k]
    brute_norms = patches.square().sum((1, 4, 5))
    flat = patches.flatten(start_dim=4).transpose(1, 3).flatten(start_dim=3)  # [n, W, H, C k k]
    brute_flat = (flat.amax(-1) == flat.amin(-1)).transpose(1, 2)  # [n, H, W]
    torch.testing.assert_close(patch_sq_norms(x, r, padding), brute_norms, rtol=1e-13, atol=1e-13)
    assert torch.equal(flat_patches(x, r, padding), brute_flat)
    assert brute_flat.any() and not brute_flat.all()


def test_runs_split_stacks_into_slices():
    def stack(pos):
        return AxisBlocks(P=torch.tensor(pos), Q=torch.tensor(pos))

    assert stack([[0], [1], [2], [7], [8]]).runs("Q") == [(0, 3, 0), (3, 5, 7)]
    assert stack([[3, 4, 5]]).runs("P") == [(0, 1, 3)]
    assert stack([[3, 4], [7, 8]]).runs("Q") == [(0, 1, 3), (1, 2, 7)]
    assert stack([[3, 5]]).runs("Q") is None


@pytest.mark.parametrize("kind, padding, wrap", [("els", "zeros", True), ("els", "circular", True),
                                                  ("els", "circular", False), ("ls", "zeros", True),
                                                  ("ls", "circular", True)])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_block_views_are_select_blocks_in_pieces(kind, padding, wrap, k):
    x = _images(10 + k)
    t_win = patch_windows(x, k // 2, padding)
    geometry = make_geometry(kind, padding, 9, 7, k, wrap=wrap)
    for rows, cols in geometry.groups():
        for which in ("P", "Q"):
            whole = select_blocks(t_win, rows, cols, which)
            pieces = block_views(t_win, rows, cols, which)
            assert pieces is not None
            covered = torch.zeros(whole.shape[2], whole.shape[4], dtype=torch.int64)
            for rb, cb, view in pieces:
                assert view.untyped_storage().data_ptr() == t_win.untyped_storage().data_ptr()  # a view, not a copy
                assert torch.equal(view, whole[:, :, rb, :, cb])
                covered[rb, cb] += 1
            assert bool((covered == 1).all())
