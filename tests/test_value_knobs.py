"""Real-valued locality knobs: data-locality's threshold and the smoothing std as sigma-keyed schedules.

``ValueSchedule`` (patchmosaic.schedules), the denoisers taking one, their calibration against a
"network" that is the same denoiser with a known value (recovered at every step), and the CLI path:
``calibrate --denoiser data-locality|smoothed`` -> ``sample``/``compare --threshold FILE / --std FILE``.
"""

import json

import numpy as np
import pytest
import torch

from patchmosaic import PatchSchedule
from patchmosaic.calibration import calibrate, check_candidates
from patchmosaic.denoisers import DataLocality, Smoothed
from patchmosaic.denoisers.registry import build_denoiser
from patchmosaic.runs import load_samples
from patchmosaic.samplers import noise_for_seeds, sample_seeds
from patchmosaic.schedules import ValueSchedule, sigmas_cosine
from tests.test_calibration import invoke, tiny_model  # noqa: F401 (fixture)

H = W = 8


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand((12, 1, H, W), generator=g, dtype=torch.float64) * 2 - 1  # [12, 1, H, W]


def test_value_schedule_lookup_and_files(tmp_path):
    v = ValueSchedule("threshold", (0.01, 0.02, 0.05), (0.1, 1.0, 10.0))
    # nearest key in log sigma, like PatchSchedule.size_at; the ends extend
    assert [v(s) for s in (0.01, 0.31, 0.32, 3.1, 3.2, 1e3)] == [0.01, 0.01, 0.02, 0.02, 0.05, 0.05]
    assert v.on_grid([10.0, 1.0, 0.0]) == (0.05, 0.02)
    v.save(tmp_path / "t.json", note="x")
    back = ValueSchedule.load(tmp_path / "t.json", "threshold")
    assert (back.values, back.sigmas, back.parameter) == (v.values, v.sigmas, "threshold")
    assert ValueSchedule.load(tmp_path, "threshold").values == v.values if (tmp_path / "schedule.json").exists() else True
    with pytest.raises(ValueError, match="schedules 'threshold', not 'std'"):
        ValueSchedule.load(tmp_path / "t.json", "std")
    PatchSchedule((3, 5)).save(tmp_path / "k.json")
    with pytest.raises(ValueError, match="is a patch-size schedule"):
        ValueSchedule.load(tmp_path / "k.json", "threshold")
    with pytest.raises(ValueError, match="strictly ascending"):
        ValueSchedule("std", (0.1, 0.2), (1.0, 0.5))
    with pytest.raises(ValueError, match="finite"):
        ValueSchedule("std", (float("nan"),), (1.0,))
    with pytest.raises(ValueError, match="one sigma per value"):
        ValueSchedule("std", (0.1, 0.2), (1.0,))


def test_denoisers_with_a_schedule_equal_the_constant_at_each_sigma(images):
    v = ValueSchedule("threshold", (0.002, 0.3), (0.5, 5.0))
    dl = DataLocality(images, threshold=v)
    x = torch.randn((3, 1, H, W), dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for sigma, t in ((0.3, 0.002), (4.0, 0.3)):
        torch.testing.assert_close(dl(x, sigma), DataLocality(images, threshold=t)(x, sigma), rtol=0, atol=0)
    # one batch with two sigmas: each row gets its own threshold
    mixed = dl(x, torch.tensor([0.3, 4.0, 0.3], dtype=torch.float64))
    torch.testing.assert_close(mixed[1], DataLocality(images, threshold=0.3)(x[1:2], 4.0)[0], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"thresholds must be in \(0, 1\]"):
        DataLocality(images, threshold=ValueSchedule("threshold", (0.5, 1.5), (0.5, 5.0)))
    with pytest.raises(ValueError, match="not a threshold schedule"):
        DataLocality(images, threshold=ValueSchedule("std", (0.5,), (1.0,)))
    # smoothed: row b perturbed with std(sigma_b), the same draws as the constant's
    s = ValueSchedule("std", (0.0, 0.4), (0.5, 5.0))
    for sigma, std in ((0.3, 0.0), (4.0, 0.4)):
        a = build_denoiser("smoothed", images, std=s, draws=3)(x, sigma)
        b = build_denoiser("smoothed", images, std=std, draws=3)(x, sigma)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="std values must be >= 0"):
        Smoothed(lambda x, s: x, std=ValueSchedule("std", (-0.1,), (1.0,)), draws=1)


@pytest.mark.parametrize(("name", "truth", "candidates"), [
    ("data-locality", 0.05, (0.005, 0.02, 0.05, 0.2)),
    ("smoothed", 0.3, (0.0, 0.1, 0.3, 0.6)),
])
def test_calibration_recovers_the_knob_of_a_known_network(images, name, truth, candidates):
    """A 'network' that is the denoiser at a known value: at every step and seed that value scores best."""
    knob = "threshold" if name == "data-locality" else "std"
    network = build_denoiser(name, images, **{knob: truth})
    candidate = build_denoiser(name, images, **{knob: candidates[0]})
    noise = noise_for_seeds([0, 1, 2], (1, H, W), dtype=torch.float64)  # [3, 1, H, W]
    result = calibrate(network, candidate, noise, candidates=candidates, steps=5, seeds=[0, 1, 2])
    assert isinstance(result.schedule, ValueSchedule) and result.schedule.parameter == knob
    j = candidates.index(truth)
    best = result.scores.max(axis=1)  # [steps, S]
    np.testing.assert_allclose(result.scores[:, j], best, rtol=0, atol=1e-12)  # the truth is (one of) the best
    np.testing.assert_allclose(result.scores[:, j], 1.0, atol=1e-9)  # cosine 1: identical estimates
    untied = np.sort(result.scores, axis=1)[:, -2, :] < best - 1e-9  # [steps, S]: a unique best candidate
    assert untied.any() and (result.choices[untied] == truth).all()  # where one candidate wins, it is the truth
    assert getattr(candidate, knob) == candidates[0]  # candidates are copies
    with pytest.raises(ValueError, match=f"candidate {knob} values must be"):
        check_candidates(candidate, (-1.0,) if name == "smoothed" else (0.0,))


def test_calibrate_sample_and_compare_with_a_threshold_schedule(tiny_model, tmp_path):
    ckpt, data = tiny_model
    cal = tmp_path / "cal"
    done = invoke("calibrate", "--model", ckpt, "--denoiser", "data-locality", "--candidates", "0.01,0.1,0.5",
                  "--seeds", "0-1", "--steps", "3", "--out", cal)
    assert done.exit_code == 0, done.output + repr(done.exception)
    assert "calibrated threshold (lowest noise first" in done.output
    saved = json.loads((cal / "schedule.json").read_text())
    assert saved["parameter"] == "threshold" and len(saved["values"]) == 3
    assert set(saved["values"]) <= {0.01, 0.1, 0.5} and saved["calibration"]["candidates"] == [0.01, 0.1, 0.5]
    assert json.loads((cal / "config.json").read_text())["threshold"] == saved["values"]
    schedule = ValueSchedule.load(cal / "schedule.json", "threshold")
    # sample takes it as --threshold FILE, and equals the library with that schedule
    out = tmp_path / "s"
    done = invoke("sample", "--denoiser", "data-locality", "--dataset", data, "--size", "native", "--steps", "3",
                  "--threshold", cal / "schedule.json", "--seeds", "0-1", "--out", out)
    assert done.exit_code == 0, done.output + repr(done.exception)
    from patchmosaic.data import load_dataset
    train = load_dataset(str(data), size=None).images
    expected = sample_seeds(DataLocality(train, threshold=schedule), [0, 1], (1, H, W), sigmas=sigmas_cosine(3))
    np.testing.assert_allclose(load_samples(out)["images"], expected.numpy(), atol=1e-6)
    recorded = json.loads((out / "config.json").read_text())["denoiser_params"]["threshold"]
    assert recorded["values"] == saved["values"] and recorded["parameter"] == "threshold"
    # compare records where the threshold came from
    cmp = tmp_path / "cmp"
    done = invoke("compare", "--model", ckpt, "--denoisers", "data-locality", "--threshold", cal, "--seeds", "0-1",
                  "--steps", 3, "--network-steps", 3, "--bootstrap-resamples", 20, "--out", cmp)
    assert done.exit_code == 0, done.output + repr(done.exception)
    entry = json.loads((cmp / "leaderboard.json").read_text())["leaderboard"][0]
    assert entry["parameters"]["threshold"]["values"] == saved["values"]
    values = ",".join(f"{v:g}" for v in saved["values"])
    assert f"threshold(sigma)={values} ({cal / 'schedule.json'})" in (cmp / "leaderboard.md").read_text()
    # a patch-size schedule, or a std file, is not a threshold
    PatchSchedule((3, 5)).save(tmp_path / "k.json")
    bad = invoke("sample", "--denoiser", "data-locality", "--dataset", data, "--size", "native",
                 "--threshold", tmp_path / "k.json", "--out", tmp_path / "s2")
    assert bad.exit_code == 2 and "is a patch-size schedule" in bad.output and "--threshold" in bad.output
    bad = invoke("calibrate", "--model", ckpt, "--denoiser", "smoothed", "--candidates", "0.1,x", "--out",
                 tmp_path / "c2")
    assert bad.exit_code == 2 and "comma-separated numbers" in bad.output


def test_compare_ls_gets_its_own_schedule(tiny_model, tmp_path):
    ckpt, _ = tiny_model
    cmp = tmp_path / "cmp"
    done = invoke("compare", "--model", ckpt, "--denoisers", "els,ls", "--patch-sizes", "3,5", "--ls-patch-sizes",
                  "5,7", "--seeds", "0-1", "--network-steps", 2, "--bootstrap-resamples", 20, "--out", cmp)
    assert done.exit_code == 0, done.output + repr(done.exception)
    entries = {e["name"]: e for e in json.loads((cmp / "leaderboard.json").read_text())["leaderboard"]}
    assert entries["els"]["parameters"]["patch_sizes"] == [3, 5] and entries["ls"]["parameters"]["patch_sizes"] == [5, 7]
    bad = invoke("compare", "--model", ckpt, "--denoisers", "els", "--patch-sizes", "3,5", "--ls-patch-sizes", "5,7",
                 "--out", tmp_path / "c2")
    assert bad.exit_code == 2 and "ls is not in --denoisers" in bad.output
