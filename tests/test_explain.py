"""``sample --provenance`` and ``patchmosaic explain``: recorded provenance, mosaic, novelty, consistency."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from patchmosaic import ScoreMachine, noise_for_seeds
from patchmosaic.cli import main
from patchmosaic.explain import (
    _consistency,
    _Run,
    coverage_count,
    nearest_over_shifts,
    signed_displacement,
)
from patchmosaic.provenance import ProvenanceRecorder
from patchmosaic.evaluation import nearest_training_images
from patchmosaic.runs import load_provenance
from patchmosaic.schedules import sigmas_cosine
from patchmosaic.runs import load_samples
from patchmosaic.samplers import sample

N, H, W = 10, 12, 12


@pytest.fixture
def dataset(tmp_path):
    """10 labelled 12x12 'digits': a dark background with a bright random blob (many constant patches)."""
    rng = np.random.default_rng(0)
    images = np.zeros((N, H, W), dtype=np.uint8)
    images[:, 4:8, 4:8] = rng.integers(0, 256, (N, 4, 4))
    path = tmp_path / "blobs.npz"
    np.savez(path, images=images, labels=np.arange(N) % 2)
    return path


def _sample(dataset, out, *extra):
    args = ["sample", "--dataset", dataset, "--size", "native", "--machine", "els", "--patch-sizes", "3,3,5,5,5,7",
            "--steps", "6", "--seeds", "0-2", "--out", out, *extra]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_sample_provenance_records_the_final_step(dataset, tmp_path):
    out = tmp_path / "run"
    result = _sample(dataset, out, "--provenance", "--provenance-top", "4")
    assert "provenance.npz" in result.output
    prov = load_provenance(out / "provenance.npz", n_train=N)
    assert prov["index"].shape == (3, H, W, 4) and prov["n_eff"].shape == (6, 3, H, W)
    assert prov["sigma"].tolist() == pytest.approx(sigmas_cosine(6)[:-1].tolist())
    assert prov["step_patch_sizes"].tolist() == [7, 5, 5, 5, 3, 3] and int(prov["patch_size"]) == 3
    config = json.loads((out / "config.json").read_text())
    assert config["provenance"]["top"] == 4 and config["provenance"]["file"] == "provenance.npz"

    # Same samples as without --provenance, and the record equals a direct call at the final step.
    plain = tmp_path / "plain"
    _sample(dataset, plain)
    got, want = load_samples(out)["images"], load_samples(plain)["images"]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    from patchmosaic.data import load_dataset

    train = load_dataset(str(dataset), size=None).images
    machine = ScoreMachine(train, kind="els", padding="zeros")
    recorder = ProvenanceRecorder(machine.bind(patch_sizes="3,3,5,5,5,7"), steps=6, top=4)
    sample(recorder, noise_for_seeds([0, 1, 2], (1, H, W)), steps=6)
    direct = recorder.arrays()
    np.testing.assert_array_equal(prov["index"], direct["index"])
    np.testing.assert_allclose(prov["weight"], direct["weight"], rtol=1e-6)
    np.testing.assert_allclose(prov["n_eff"], direct["n_eff"], rtol=1e-6)
    assert (np.diff(prov["weight"], axis=-1) <= 1e-7).all(), "entries are not sorted by weight"
    assert (prov["weight"].sum(-1) <= 1 + 1e-5).all() and (prov["n_eff"] >= 1 - 1e-4).all()
    assert (prov["count"][..., 0] > 1).any(), "the dark background should be a constant-patch entry"


def test_provenance_refused_for_networks(dataset, tmp_path):
    result = CliRunner().invoke(main, ["sample", "--model", "pretrained:mnist-resnet-zeros", "--provenance",
                                       "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--provenance" in result.output and "--model" in result.output


def test_recorder_checks_its_use(dataset):
    from patchmosaic.data import load_dataset

    machine = ScoreMachine(load_dataset(str(dataset), size=None).images, kind="els")
    recorder = ProvenanceRecorder(machine.bind(patch_sizes="3,3"), steps=2, top=2)
    with pytest.raises(ValueError, match="saw 0 of 2 calls"):
        recorder.arrays()
    sample(recorder, noise_for_seeds([0], (1, H, W)), steps=2)
    with pytest.raises(ValueError, match="one run of 2 calls"):
        recorder(torch.zeros(1, 1, H, W), 0.5)


def test_explain_end_to_end(dataset, tmp_path):
    out = tmp_path / "run"
    _sample(dataset, out, "--provenance")
    result = CliRunner().invoke(main, ["explain", str(out)])
    assert result.exit_code == 0, result.output
    assert "cover 90%" in result.output and "consistency" in result.output
    data = json.loads((out / "explain.json").read_text())
    for name in ("explain_mosaic.png", "explain_displacement.png", "explain_neff.png"):
        assert (out / name).stat().st_size > 1000
    assert len(data["per_seed"]) == 3 and data["final_patch_size"] == 3
    for row in data["per_seed"]:
        assert 0 <= row["consistent_fraction"] <= 1 and 0 <= row["single_source_fraction"] <= 1
        parts = row["single_source_fraction"] + row["constant_fraction"] + row["diffuse_fraction"]
        assert parts == pytest.approx(1.0) and row["constant_fraction"] > 0
        assert 1 <= row["images_for_90pct"] <= row["distinct_images"] <= N
        assert row["ideal_nn_rms"] < 0.05, "the ideal machine memorises: its samples are (near) training images"
        assert row["nn_shift_rms"] <= row["nn_rms"] + 1e-9
    assert len(data["n_eff_over_time"]["median_n_eff"]) == 3 and len(data["n_eff_over_time"]["sigma"]) == 6
    # Never overwrites without asking; --overwrite replaces only explain's own files.
    again = CliRunner().invoke(main, ["explain", str(out)])
    assert again.exit_code != 0 and "--overwrite" in again.output
    again = CliRunner().invoke(main, ["explain", str(out), "--overwrite", "--no-compare-ideal"])
    assert again.exit_code == 0, again.output
    data = json.loads((out / "explain.json").read_text())
    assert "ideal_nn_rms" not in data["per_seed"][0]
    assert (out / "samples.npz").is_file() and (out / "provenance.npz").is_file()


def test_explain_needs_provenance(dataset, tmp_path):
    out = tmp_path / "run"
    _sample(dataset, out)
    result = CliRunner().invoke(main, ["explain", str(out)])
    assert result.exit_code != 0 and "--provenance" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "run directory not found" in result.output


def test_signed_displacement_and_coverage():
    source = np.zeros((1, 4, 6, 2), dtype=np.int64)  # every pixel comes from (0, 0)
    d = signed_displacement(source, 4, 6, circular=False)
    assert d[0, 3, 5].tolist() == [-3, -5]
    d = signed_displacement(source, 4, 6, circular=True)
    assert d[0, 3, 5].tolist() == [1, 1] and d[0, 2, 3].tolist() == [-2, -3]  # shortest way round the torus
    assert coverage_count(np.array([1] * 5 + [2] * 3 + [3] * 2)) == 3  # 90% of 10 needs 9 pixels
    assert coverage_count(np.array([1] * 9 + [2])) == 1
    assert coverage_count(np.array([], dtype=np.int64)) == 0


def test_nearest_training_images_brute_force():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(5, 2, 4, 5, generator=g) * 2 - 1
    x = torch.stack([train[3] + 0.01, torch.roll(train[1], (1, 3), dims=(1, 2))])
    idx, dist = nearest_training_images(x, train)
    sidx, srms, shift = nearest_over_shifts(x, train)
    assert idx[0] == 3 and dist[0] / np.sqrt(x[0].numel()) == pytest.approx(0.01, abs=1e-6)
    assert sidx[1] == 1 and srms[1] == pytest.approx(0.0, abs=1e-6) and shift[1].tolist() == [1, 3]
    for b in range(2):  # brute force over images and shifts
        best = min(((x[b] - torch.roll(t, (sy, sx), dims=(1, 2))) ** 2).mean().sqrt().item()
                   for t in train for sy in range(4) for sx in range(5))
        assert srms[b] == pytest.approx(best, abs=1e-6)


def test_consistency_condition_exact_cases():
    """Training images satisfy it everywhere; a changed pixel breaks it there."""
    g = torch.Generator().manual_seed(1)
    train = torch.rand(4, 1, 6, 6, generator=g) * 2 - 1
    prov = {"patch_size": np.array(3)}
    config = {"machine": "els", "padding": "zeros", "wrap_training_patches": None}
    run = _Run(config, train[:2].clone(), np.array([0, 1]), None, prov)
    frac, gap = _consistency(run, train, None, tolerance=1e-6)
    assert frac.tolist() == [1.0, 1.0] and gap.max() < 1e-6
    images = train[:2].clone()
    images[0, 0, 3, 3] = 5.0  # no training pixel is near 5
    run = _Run(config, images, np.array([0, 1]), None, prov)
    frac, _ = _consistency(run, train, None, tolerance=1e-6)
    assert frac[0] <= 1 - 1 / 36 and frac[1] == 1.0
    assert _consistency(_Run({**config, "machine": "ideal"}, images, np.array([0, 1]), None, prov),
                        train, None, 1e-6) is None


def test_overwrite_refuses_to_leave_derived_files_stale(dataset, tmp_path):
    """Re-sampling into a run dir would make its provenance and explain files describe other samples."""
    out = tmp_path / "run"
    _sample(dataset, out, "--provenance")
    assert CliRunner().invoke(main, ["explain", str(out), "--no-compare-ideal"]).exit_code == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    for extra in ([], ["--provenance"]):
        args = ["sample", "--dataset", str(dataset), "--size", "native", "--machine", "els", "--patch-sizes",
                "3,3,5,5,5,7", "--steps", "6", "--seeds", "0-2", "--out", str(out), "--overwrite", *extra]
        result = CliRunner().invoke(main, args)
        assert result.exit_code != 0 and "explain.json" in result.output and "describing other samples" in result.output
        assert ("provenance.npz" in result.output) == (not extra)  # --provenance rewrites it
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before, "a refused run touched files"
