"""``patchmosaic sample`` on every sampler, grid and denoiser of the protocol, on a tiny .npz set."""

import json

import numpy as np
import pytest
import torch

import patchmosaic
from patchmosaic import ScoreMachine, sample_heun, sigmas_karras
from patchmosaic.data import load_dataset
from patchmosaic.denoisers import build_denoiser
from patchmosaic.runs import load_samples
from patchmosaic.samplers import initial_state, noise_for_seeds, sample_seeds
from test_cli import H, W, assert_clean_error, ok, run, tiny  # noqa: F401 - the 6-image dataset fixture


def test_heun_on_a_karras_grid_matches_the_library(tiny, tmp_path):
    out = tmp_path / "heun"
    ok("--dataset", tiny, "--size", "native", "--machine", "els", "--patch-sizes", "3,5,7",
       "--grid", "karras", "--steps", "4", "--sampler", "heun", "--seeds", "0-2", "--dtype", "float64", "--out", out)
    config = json.loads((out / "config.json").read_text())
    sigmas = sigmas_karras(4)
    assert config["sampler"] == "heun" and config["grid"] == "karras"
    assert config["sigmas"] == pytest.approx(sigmas.tolist())
    # Three sizes keyed to the 3-step cosine grid, applied on a 4-step Karras grid by nearest log sigma.
    bound = ScoreMachine(load_dataset(str(tiny), size=None).images.double(), kind="els").bind(patch_sizes=[3, 5, 7])
    assert config["patch_sizes"] == [bound.patch_size_at(s) for s in sigmas[:-1].flip(0)]
    want = sample_heun(bound, initial_state(noise_for_seeds([0, 1, 2], (1, H, W), dtype=torch.float64), sigmas),
                       sigmas)
    np.testing.assert_allclose(load_samples(out)["images"], want.float().numpy(), atol=1e-6)


def test_ancestral_is_reproducible_and_independent_of_the_batch_size(tiny, tmp_path):
    args = ["--dataset", tiny, "--size", "native", "--machine", "ideal", "--sampler", "ancestral", "--grid",
            "vp-linear", "--steps", "5", "--seeds", "0-3"]
    ok(*args, "--batch-size", "4", "--out", tmp_path / "a")
    ok(*args, "--batch-size", "1", "--out", tmp_path / "b")
    a, b = load_samples(tmp_path / "a")["images"], load_samples(tmp_path / "b")["images"]
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a[0], a[1])


FAMILY = [
    ("wiener", []),
    ("wiener", ["--rank", "3"]),
    ("data-locality", ["--threshold", "0.5"]),
    ("pspc", ["--patch-size", "3"]),
    ("pspc", ["--patch-size", "4", "--flips"]),
    ("smoothed", ["--std", "0.1", "--draws", "2"]),
    ("topk", ["--k", "3"]),
    ("knn", ["--k", "2", "--samples", "3"]),
    ("nearest", []),
]


@pytest.mark.parametrize("name,params", FAMILY)
def test_every_family_denoiser_samples_from_the_cli(tiny, tmp_path, name, params):
    out = tmp_path / "run"
    ok("--dataset", tiny, "--size", "native", "--denoiser", name, *params, "--steps", "3", "--seeds", "0-1",
       "--dtype", "float64", "--out", out)
    config = json.loads((out / "config.json").read_text())
    assert config["machine"] == name and config["padding"] is None
    data = load_dataset(str(tiny), size=None)
    given = config["denoiser_params"]
    denoiser = build_denoiser(name, data.images.double(), labels=data.labels, **given)
    want = sample_seeds(denoiser, [0, 1], (1, H, W), sigmas=patchmosaic.sigmas_cosine(3), dtype=torch.float64)
    np.testing.assert_allclose(load_samples(out)["images"], want.float().numpy(), atol=1e-6)


def test_family_denoisers_are_conditioned_by_label(tiny, tmp_path):
    out = tmp_path / "run"
    ok("--dataset", tiny, "--size", "native", "--denoiser", "nearest", "--steps", "2", "--seeds", "0-3",
       "--label", "1", "--out", out)
    data = load_dataset(str(tiny), size=None)
    images = load_samples(out)["images"]
    members = data.images[data.labels == 1].numpy()
    for img in images:  # the nearest denoiser returns a training image of class 1
        assert min(np.abs(img - m).max() for m in members) < 1e-6


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--denoiser", "topk", "--k", "99"], ["--denoiser", "k must be in 1..6"]),
        (["--denoiser", "data-locality", "--threshold", "2"], ["threshold"]),
        (["--denoiser", "smoothed"], ["needs the parameter std"]),
        (["--denoiser", "wiener", "--patch-sizes", "3,3"], ["no patch schedule"]),
        (["--denoiser", "els", "--patch-sizes", "3,3", "--k", "3"], ["k apply to the closed-form family"]),
        (["--denoiser", "wiener", "--provenance"], ["--provenance", "not --denoiser wiener"]),
        (["--denoiser", "topk", "--k", "2", "--provenance"], ["--provenance", "not --denoiser topk"]),
        (["--machine", "ideal", "--device", "cuda:7"], ["--device"]),
        (["--machine", "ideal", "--device", "tpu"], ["--device"]),
        (["--machine", "ideal", "--grid", "linear"], ["--grid"]),
    ],
)
def test_bad_denoiser_flags_are_usage_errors(tiny, tmp_path, args, fragments):
    out = tmp_path / "run"
    result = run("--dataset", tiny, "--size", "native", "--steps", "2", *args, "--out", out)
    assert_clean_error(result, *fragments)
    assert result.exit_code == 2 and not out.exists()


def test_device_cpu_and_threads_are_accepted(tiny, tmp_path):
    ok("--dataset", tiny, "--size", "native", "--machine", "ideal", "--steps", "2", "--seeds", "0",
       "--device", "cpu", "--threads", "1", "--out", tmp_path / "run")
