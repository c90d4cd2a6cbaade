"""Noise and locality schedules."""

from __future__ import annotations

import math

import pytest
import torch

import json
from pathlib import Path

import numpy as np

import patchmosaic
from patchmosaic import PRESETS, CosineSchedule, PatchSchedule, sigmas_cosine, sigmas_karras, sigmas_vp_linear, time_grid
from patchmosaic.schedules import make_grid


def test_cosine_schedule_values_and_inverse():
    sched = CosineSchedule()
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    ab = sched.alpha_bar(t)
    torch.testing.assert_close(ab, torch.cos(t / 1.008 * math.pi / 2) ** 2)
    assert float(ab[0]) == 1.0 and 0 < float(ab[-1]) < 1e-3
    assert bool((ab[1:] < ab[:-1]).all())
    torch.testing.assert_close(sched.t_from_alpha_bar(ab), t)


def test_time_grid():
    torch.testing.assert_close(time_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="positive integer"):
        time_grid(0)


def test_presets_are_twenty_odd_sizes_keyed_to_the_cosine_grid():
    paper = {name: sched for name, sched in PRESETS.items() if name != "cifar10-pspc-square"}
    assert len(paper) == 10
    keys = sigmas_cosine(20).flip(0)[1:].tolist()  # t = 1/20 .. 1
    for name, sched in paper.items():
        assert len(sched) == 20 and all(k % 2 == 1 for k in sched.sizes), name
        assert list(sched.sigmas) == keys and sched.name == name
    assert PRESETS["mnist-resnet-zeros"].sizes[0] == 3 and PRESETS["mnist-resnet-zeros"].sizes[-1] == 15
    pspc = PRESETS["cifar10-pspc-square"]  # uncentred windows on the 18-step Karras grid
    assert not pspc.centred and pspc.on_grid(sigmas_karras(18)) == (32,) * 7 + (23, 15, 11, 7, 5) + (3,) * 6


def test_patch_schedule_lookup_nearest_in_log_sigma():
    s = PatchSchedule((3, 5, 7), (0.1, 1.0, 10.0))
    assert [s(x) for x in (1e-4, 0.1, 0.3, 0.32, 1.0, 3.0, 3.2, 10.0, 1e4)] == [3, 3, 3, 5, 5, 5, 7, 7, 7]
    assert s.size_at(math.sqrt(0.1)) == 3  # the log midpoint: ties go to the lower-noise key
    assert s.on_grid(torch.tensor([20.0, 1.0, 0.05, 0.0])) == (7, 5, 3)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite sigma > 0"):
            s(bad)
    with pytest.raises(ValueError, match="strictly ascending"):
        PatchSchedule((3, 5), (1.0, 0.5))
    with pytest.raises(ValueError, match="one sigma per size"):
        PatchSchedule((3, 5), (1.0,))


def test_step_indexed_sizes_key_to_the_cosine_grid():
    s = PatchSchedule((3, 5, 7, 9))
    sig = sigmas_cosine(4)  # t = 1, 3/4, 1/2, 1/4, 0
    assert [s(x) for x in sig[:-1]] == [9, 7, 5, 3]
    other = PatchSchedule.from_steps((3, 5, 7, 9), CosineSchedule(s=0.3))
    assert [other(x) for x in sigmas_cosine(4, CosineSchedule(s=0.3))[:-1]] == [9, 7, 5, 3]


def test_parse_and_file_round_trip(tmp_path):
    assert PatchSchedule.parse("mnist-resnet-zeros") == PRESETS["mnist-resnet-zeros"]
    assert PatchSchedule.parse("3, 5,7").sizes == (3, 5, 7)
    path = tmp_path / "k.json"
    PatchSchedule((3, 5, 7), (0.2, 2.0, 20.0)).save(path, source="test")
    loaded = PatchSchedule.parse(str(path))
    assert loaded.sizes == (3, 5, 7) and loaded.sigmas == (0.2, 2.0, 20.0) and loaded.name == str(path)
    assert json.loads(path.read_text())["source"] == "test"


def test_old_step_indexed_schedule_files_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"patch_sizes": [3, 5, 7], "steps": 3, "order": "lowest noise first"}))
    assert PatchSchedule.load(path) == PatchSchedule((3, 5, 7), name=str(path))
    for name in ("mnist-resnet-zeros", "fashion-resnet-zeros-cond"):  # the committed calibrated schedules
        sched = PatchSchedule.load(Path(patchmosaic.__file__).parent / "pretrained" / name / "schedule.json")
        assert len(sched) == 20 and sched.sigmas == PRESETS["mnist-resnet-zeros"].sigmas


def test_sigma_grids_match_their_formulas():
    sched = CosineSchedule()
    g = sigmas_cosine(5)
    t = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], dtype=torch.float64)
    ab = torch.cos(t / 1.008 * math.pi / 2) ** 2
    torch.testing.assert_close(g[:-1], ((1 - ab) / ab).sqrt())
    assert g[-1] == 0 and g.dtype == torch.float64 and abs(float(g[0]) - 80.2) < 0.1
    k = sigmas_karras(18)
    i = torch.arange(18, dtype=torch.float64)
    want = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    torch.testing.assert_close(k[:-1], want)
    assert k[-1] == 0 and len(k) == 19 and float(k[0]) == pytest.approx(80.0) and float(k[-2]) == pytest.approx(0.002)
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    ac = np.cumprod(1 - betas, dtype=np.float32).astype(np.float64)
    lead = sigmas_vp_linear(10, "leading")
    torch.testing.assert_close(lead[:-1], torch.from_numpy(np.sqrt((1 - ac) / ac)[np.arange(9, -1, -1) * 100]), rtol=1e-5, atol=0)  # float32 schedule
    trail = sigmas_vp_linear(10, "trailing")
    torch.testing.assert_close(trail[:-1], torch.from_numpy(np.sqrt((1 - ac) / ac)[np.arange(999, -1, -100)]), rtol=1e-5, atol=0)
    for grid in (g, k, lead, trail):
        assert bool((grid[1:] < grid[:-1]).all()) and grid[-1] == 0
    torch.testing.assert_close(sched.t_from_sigma(sched.sigma(t)), t)
    with pytest.raises(ValueError, match="spacing"):
        sigmas_vp_linear(10, "middle")
    with pytest.raises(ValueError, match="unknown grid"):
        make_grid("linear", 10)


@pytest.mark.parametrize("spec,match", [("3,4,5", "must be odd"), ("3,-1", "must be positive"),
                                        ("no-such-preset", "unknown patch-size schedule"),
                                        ("missing.json", "schedule file not found")])
def test_bad_schedules(spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        PatchSchedule.parse(spec)


@pytest.mark.parametrize("content", [b"{not json", b"\x9d\x00\xff binary", b"[1, 2]", b'{"patch_sizes": [3, 4]}'])
def test_corrupt_schedule_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\")):
        PatchSchedule.load(path)
