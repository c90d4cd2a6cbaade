"""Noise and locality schedules."""

from __future__ import annotations

import math

import pytest
import torch

from patchmosaic import PRESETS, CosineSchedule, PatchSchedule, time_grid


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


def test_presets_are_twenty_odd_sizes():
    assert len(PRESETS) == 10
    for name, sizes in PRESETS.items():
        assert len(sizes) == 20 and all(k % 2 == 1 for k in sizes), name
    assert PRESETS["mnist-resnet-zeros"][0] == 3 and PRESETS["mnist-resnet-zeros"][-1] == 15


def test_patch_schedule_lookup_lowest_noise_first():
    s = PatchSchedule((3, 5, 7, 9))
    assert [s.at(i / 4) for i in (1, 2, 3, 4)] == [3, 5, 7, 9]
    for bad_t in (0.0, 0.3, 1.25):
        with pytest.raises(ValueError, match="not on this schedule's grid"):
            s.at(bad_t)


def test_parse_and_file_round_trip(tmp_path):
    assert PatchSchedule.parse("mnist-resnet-zeros").sizes == PRESETS["mnist-resnet-zeros"]
    assert PatchSchedule.parse("3, 5,7").sizes == (3, 5, 7)
    path = tmp_path / "k.json"
    PatchSchedule((3, 5, 7)).save(path, source="test")
    loaded = PatchSchedule.parse(str(path))
    assert loaded.sizes == (3, 5, 7) and loaded.name == str(path)


@pytest.mark.parametrize("spec,match", [("3,4,5", "must be odd"), ("3,-1", "must be positive"),
                                        ("no-such-preset", "unknown patch-size schedule"),
                                        ("missing.json", "schedule file not found")])
def test_bad_schedules(spec, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        PatchSchedule.parse(spec)


def test_corrupt_schedule_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a schedule file"):
        PatchSchedule.load(path)
