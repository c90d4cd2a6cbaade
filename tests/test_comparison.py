"""Any denoiser against a network: trajectories, per-step agreement and ``patchmosaic compare``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchmosaic import ScoreMachine
from patchmosaic.comparison import matching_steps, per_step_agreement, run_trajectory
from patchmosaic.data import load_dataset
from patchmosaic.denoisers import Wiener
from patchmosaic.evaluation import pearson_r
from patchmosaic.runs import load_samples
from patchmosaic.samplers import initial_state, noise_for_seeds, sample_seeds
from patchmosaic.schedules import sigmas_cosine
from tests.test_evaluation import H, W, invoke, ok, tiny_checkpoint


def test_matching_steps_are_exact_on_equal_and_nested_grids():
    s2, s4 = sigmas_cosine(2).numpy(), sigmas_cosine(4).numpy()
    assert matching_steps(s4, s4).tolist() == [0, 1, 2, 3]
    assert matching_steps(s2, s4).tolist() == [0, 2]  # t = 1, 1/2 of the 2-step grid sit on the 4-step grid
    with pytest.raises(ValueError, match="sigma > 0"):
        matching_steps(np.array([1.0, 0.0, 0.0]), s4)


def test_trajectory_records_each_steps_input_and_output():
    rng = np.random.default_rng(0)
    train = torch.as_tensor(rng.uniform(-1, 1, size=(7, 1, 4, 4)), dtype=torch.float32)
    wiener = Wiener(train)
    sigmas = sigmas_cosine(3)
    seeds = [5, 1, 9]
    traj = run_trajectory(wiener, seeds, (1, 4, 4), sigmas=sigmas, batch_size=2)
    np.testing.assert_array_equal(traj.final, sample_seeds(wiener, seeds, (1, 4, 4), sigmas=sigmas,
                                                                batch_size=2).numpy())
    np.testing.assert_array_equal(traj.x[0], initial_state(noise_for_seeds(seeds, (1, 4, 4)), sigmas).numpy())
    for i in range(3):  # the recorded output is D at the recorded state, and the Euler step links them
        expected = wiener(torch.as_tensor(traj.x[i]), float(sigmas[i])).numpy()
        np.testing.assert_allclose(traj.denoised[i], expected, atol=1e-5)
        if i < 2:
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            step = traj.x[i] + (s_next - s) * (traj.x[i] - traj.denoised[i]) / s
            np.testing.assert_allclose(traj.x[i + 1], step, atol=1e-5)
    # against itself: r = 1 along the trajectory and at the same x
    agree = per_step_agreement(traj, traj, network_denoiser=wiener)
    np.testing.assert_allclose(agree["trajectory"]["pearson_r"], 1.0, atol=1e-6)
    np.testing.assert_allclose(agree["single_step"]["pearson_r"], 1.0, atol=1e-5)
    assert agree["network_step"] == [0, 1, 2]


def test_compare_end_to_end_and_report(tmp_path):
    ckpt, data = tiny_checkpoint(tmp_path)
    out = tmp_path / "cmp"
    result = ok("compare", "--model", ckpt, "--denoisers", "ideal,els,wiener,nearest", "--patch-sizes", "3,5",
                "--seeds", "0-4", "--network-steps", 4, "--out", out, "--bootstrap-resamples", 200,
                "--batch-size", 2)
    assert "| `els` |" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "comparison.png", "leaderboard.json", "leaderboard.md", "per_step.png", "samples_els.npz",
        "samples_ideal.npz", "samples_nearest.npz", "samples_network.npz", "samples_wiener.npz"]
    for png in ("comparison.png", "per_step.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200
    board = json.loads((out / "leaderboard.json").read_text())
    entries = {e["name"]: e for e in board["leaderboard"]}
    assert set(entries) == {"ideal", "els", "wiener", "nearest"}
    medians = [e["metrics"]["pearson_r"]["median"] for e in board["leaderboard"]]
    assert medians == sorted(medians, reverse=True)  # best first
    cfg = board["config"]
    assert cfg["steps"] == 2 and cfg["network_steps"] == 4 and cfg["sampler"] == "euler" and cfg["grid"] == "cosine"
    assert entries["els"]["parameters"]["patch_sizes"] == [3, 5] and entries["wiener"]["parameters"] == {"rank": None}
    assert entries["els"]["steps"] == 2 and entries["els"]["network_steps"] == 4 and entries["els"]["n_seeds"] == 5
    # the numbers are those of the saved samples
    net = load_samples(out / "samples_network.npz")["images"]
    for name in ("els", "wiener"):
        r = pearson_r(net, load_samples(out / f"samples_{name}.npz")["images"])
        assert entries[name]["metrics"]["pearson_r"]["median"] == pytest.approx(float(np.median(r)), abs=1e-9)
        assert entries[name]["els_beats_this"]["n"] == 5 if name != "els" else entries[name]["els_beats_this"] is None
    # the machines are the library's from the same noise, on the network's training set
    images = load_dataset(str(data), size=None).images
    els = sample_seeds(ScoreMachine(images, kind="els", padding="zeros").bind(patch_sizes=[3, 5]), list(range(5)),
                       (1, H, W), sigmas=sigmas_cosine(2))
    np.testing.assert_allclose(load_samples(out / "samples_els.npz")["images"], els.numpy(), atol=1e-5)
    # per step: 2 denoiser steps matched to network steps 0 and 2 (nested cosine grids)
    assert board["per_step"]["els"]["network_step"] == [0, 2]
    assert len(board["per_step"]["wiener"]["single_step"]["pearson_r"]) == 2
    md = (out / "leaderboard.md").read_text()
    assert "150" not in md and "4 steps" in md and "| `wiener` |" in md
    # the report shows the leaderboard and the figures
    report = tmp_path / "report"
    ok("report", out, "--out", report)
    page = (report / "index.html").read_text()
    assert "Leaderboard" in page and "per_step.png" in page and "comparison.png" in page
    assert "wiener" in page and "R^2 pooled" in page
    # a second run without --overwrite is refused
    again = invoke("compare", "--model", ckpt, "--denoisers", "ideal", "--seeds", "0", "--out", out)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_compare_overwrite_refuses_samples_of_other_denoisers_and_report_reads_only_listed_ones(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    out = tmp_path / "cmp"
    common = ("--model", ckpt, "--seeds", "0-1", "--steps", 2, "--network-steps", 2, "--out", out,
              "--bootstrap-resamples", 20, "--no-single-step")
    ok("compare", *common, "--denoisers", "ideal,wiener")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # fewer denoisers: samples_wiener.npz would stay beside the new files, so --overwrite is refused, naming it
    refused = invoke("compare", *common, "--denoisers", "ideal", "--overwrite")
    assert refused.exit_code == 2, refused.output
    assert "Invalid value for '--out'" in refused.output and "samples_wiener.npz" in refused.output
    assert "samples_ideal.npz" not in refused.output.split("holds")[1].split("from an earlier run")[0]
    assert "Move or delete them" in refused.output and "Traceback" not in refused.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing written, moved or deleted
    # the same or more denoisers replace the files as before
    ok("compare", *common, "--denoisers", "wiener,ideal,nearest", "--overwrite")
    assert "samples_nearest.npz" in {p.name for p in out.iterdir()}
    # once the user removes the stale files, the smaller run goes through and lists exactly its own files
    for name in ("wiener", "nearest"):
        (out / f"samples_{name}.npz").unlink()
    ok("compare", *common, "--denoisers", "ideal", "--overwrite")
    files = json.loads((out / "leaderboard.json").read_text())["config"]["files"]
    assert sorted(f for f in files.values() if f.startswith("samples_")) == ["samples_ideal.npz",
                                                                            "samples_network.npz"]
    # a samples file put there afterwards is not shown by the report as one of this comparison's
    (out / "samples_foreign.npz").write_bytes((out / "samples_ideal.npz").read_bytes())
    ok("report", out, "--out", tmp_path / "report")
    page = (tmp_path / "report" / "index.html").read_text()
    assert "samples_ideal.npz" in page and "samples_network.npz" in page and "samples_foreign.npz" not in page


def test_compare_reuses_a_sample_run_and_equals_running_it(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    prev = tmp_path / "prev"
    ok("sample", "--like", ckpt, "--patch-sizes", "3,5", "--seeds", "0-5", "--out", prev)
    common = ("--model", ckpt, "--denoisers", "els,ideal", "--patch-sizes", "3,5", "--seeds", "4,1,2",
              "--network-steps", 3, "--bootstrap-resamples", 50)
    ok("compare", *common, "--out", tmp_path / "ran")
    ok("compare", *common, "--out", tmp_path / "reused", "--reuse", prev)
    ran, reused = (json.loads((tmp_path / d / "leaderboard.json").read_text()) for d in ("ran", "reused"))
    # the reused images are the sample run's rows for these seeds, and equal a fresh run's
    images = load_samples(tmp_path / "reused" / "samples_els.npz")
    assert images["seeds"].tolist() == [4, 1, 2]
    np.testing.assert_array_equal(images["images"], load_samples(prev)["images"][[4, 1, 2]])
    np.testing.assert_allclose(images["images"], load_samples(tmp_path / "ran" / "samples_els.npz")["images"],
                               atol=1e-6)
    entries = {e["name"]: e for e in reused["leaderboard"]}
    before = {e["name"]: e for e in ran["leaderboard"]}
    for name in ("els", "ideal"):
        assert entries[name]["metrics"]["pearson_r"]["median"] == pytest.approx(
            before[name]["metrics"]["pearson_r"]["median"], abs=1e-5)
    assert entries["ideal"]["els_beats_this"] == before["ideal"]["els_beats_this"]
    # a reused denoiser has no per-step numbers and no timing; the others keep theirs
    assert entries["els"]["parameters"]["reused_from"] == str(prev) and "seconds_per_seed" not in entries["els"]
    assert set(reused["per_step"]) == {"ideal"} and set(ran["per_step"]) == {"els", "ideal"}
    assert reused["config"]["reuse"] == {"els": str(prev)}
    assert "reused_from" in (tmp_path / "reused" / "leaderboard.md").read_text()


@pytest.mark.parametrize(
    ("sample_args", "compare_args", "fragment"),
    [
        (["--patch-sizes", "3,3"], [], "patch_sizes is [3, 3], expected [3, 5]"),
        (["--patch-sizes", "3,5", "--grid", "karras"], [], "grid is 'karras', expected 'cosine'"),
        (["--patch-sizes", "3,5"], ["--sampler", "heun"], "sampler is 'euler', expected 'heun'"),
        (["--patch-sizes", "3,5"], ["--steps", "3"], "steps is 2, expected 3"),
        (["--machine", "ls", "--patch-sizes", "3,5"], [], "takes a `sample` run of els or ideal"),
        (["--denoiser", "wiener"], [], "holds 'wiener' samples"),
    ],
)
def test_compare_reuse_validation(tmp_path, sample_args, compare_args, fragment):
    ckpt, data = tiny_checkpoint(tmp_path)
    prev = tmp_path / "prev"
    ok("sample", "--dataset", data, "--size", "native", "--steps", "2", "--seeds", "0-1", *sample_args, "--out", prev)
    out = tmp_path / "cmp"
    result = invoke("compare", "--model", ckpt, "--denoisers", "els,ideal", "--patch-sizes", "3,5", "--seeds", "0-1",
                    "--network-steps", 2, *compare_args, "--out", out, "--reuse", prev)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "--reuse" in result.output and fragment in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--denoisers", "els,foo"], "unknown denoiser(s) ['foo']"),
        (["--denoisers", "ideal,ideal"], "listed twice"),
        (["--denoisers", "knn"], "knn needs --k, --samples"),
        (["--denoisers", "ideal", "--std", "0.1"], "--std apply to none of"),
        (["--denoisers", "ideal", "--patch-sizes", "3,5"], "neither is in --denoisers"),
        (["--denoisers", "ideal", "--dataset", "mnist"], "records its own training set"),
        (["--denoisers", "es"], "es"),
        (["--denoisers", "pspc"], "pspc: patch_size must be in 1..8 (the image is 8x8), got 32 on this grid"),
    ],
)
def test_compare_usage_errors(tmp_path, args, fragment):
    ckpt, _ = tiny_checkpoint(tmp_path)
    result = invoke("compare", "--model", ckpt, "--seeds", "0", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert not (tmp_path / "o").exists()


def test_compare_workers_split_the_machines_batches(tmp_path, monkeypatch):
    """--workers 2: the machines' samples are the library's one-stream samples; the config records it."""
    seen = []
    split = ScoreMachine._in_workers

    def spy(self, x, *a, **kw):
        seen.append(self.workers)
        return split(self, x, *a, **kw)

    monkeypatch.setattr(ScoreMachine, "_in_workers", spy)
    ckpt, data = tiny_checkpoint(tmp_path)
    out = tmp_path / "cmp"
    ok("compare", "--model", ckpt, "--denoisers", "els", "--patch-sizes", "3,5", "--seeds", "0-3",
       "--network-steps", 2, "--out", out, "--bootstrap-resamples", 50, "--workers", 2)
    board = json.loads((out / "leaderboard.json").read_text())
    assert board["config"]["workers"] == 2 and seen and set(seen) == {2}
    images = load_dataset(str(data), size=None).images
    els = sample_seeds(ScoreMachine(images, kind="els", padding="zeros").bind(patch_sizes=[3, 5]), list(range(4)),
                       (1, H, W), sigmas=sigmas_cosine(2))
    np.testing.assert_allclose(load_samples(out / "samples_els.npz")["images"], els.numpy(), atol=1e-5)
