"""Metrics, bootstrap and the ``evaluate`` command (patchmosaic.evaluation)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from patchmosaic import ScoreMachine, noise_for_seeds, sample
from patchmosaic.checkpoints import load_denoiser, save_checkpoint
from patchmosaic.cli import main
from patchmosaic.data import load_dataset
from patchmosaic.evaluation import (
    beats_fraction,
    bootstrap_median,
    bootstrap_pooled_r2,
    coefficient_of_determination,
    compare,
    mean_squared_error,
    nearest_training_images,
    pearson_r,
    pooled_r2,
    r2_ads,
    summarize,
)
from patchmosaic.models import ResNetConfig, build_model
from patchmosaic.runs import load_samples
from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import PatchSchedule, sigmas_cosine
from patchmosaic.training import TrainConfig

H = W = 8


# ------------------------------------------------------------------ metrics


def test_pearson_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 1, 4, 4))
    b = rng.normal(size=(5, 1, 4, 4))
    np.testing.assert_allclose(pearson_r(a, a), 1.0, rtol=1e-12)
    np.testing.assert_allclose(pearson_r(a, -a), -1.0, rtol=1e-12)
    np.testing.assert_allclose(pearson_r(a, 3 * a + 2), 1.0, rtol=1e-12)  # invariant to scale and offset
    expected = [np.corrcoef(x.ravel(), y.ravel())[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(pearson_r(a, b), expected, rtol=1e-12)
    assert np.isnan(pearson_r(a[:1], np.zeros_like(a[:1]))[0])  # constant image: undefined
    np.testing.assert_allclose(pearson_r(torch.as_tensor(a), torch.as_tensor(b)), expected, rtol=1e-12)


def test_coefficient_of_determination_closed_forms():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(4, 1, 3, 3))
    est = rng.normal(size=(4, 1, 3, 3))
    np.testing.assert_allclose(coefficient_of_determination(ref, ref), 1.0)
    mean = np.broadcast_to(ref.mean(axis=(1, 2, 3), keepdims=True), ref.shape)
    np.testing.assert_allclose(coefficient_of_determination(ref, mean), 0.0, atol=1e-12)
    r, e = ref.reshape(4, -1), est.reshape(4, -1)
    expected = 1 - ((r - e) ** 2).sum(1) / ((r - r.mean(1, keepdims=True)) ** 2).sum(1)
    np.testing.assert_allclose(coefficient_of_determination(ref, est), expected, rtol=1e-12)
    # unlike r, R^2 penalises an offset
    shifted = compare(ref, ref + 1.0)
    np.testing.assert_allclose(shifted["pearson_r"], 1.0)
    assert (shifted["R2"] < 1.0).all()
    np.testing.assert_allclose(compare(ref, est)["r_squared"], pearson_r(ref, est) ** 2)
    with pytest.raises(ValueError, match="differ in shape"):
        pearson_r(ref, est[:2])


def test_metrics_against_a_hand_computation():
    """Two 2-image, 4-pixel cases worked out by hand (pixels in the comments)."""
    net = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]]).reshape(2, 1, 2, 2)
    est = np.array([[1.0, 2.0, 3.0, 6.0], [1.0, 1.0, 3.0, 3.0]]).reshape(2, 1, 2, 2)
    # image 0: mean 2.5, SS_tot = 2.25 + 0.25 + 0.25 + 2.25 = 5, SS_res = 4, n = 4
    # image 1: mean 1, SS_tot = 4, SS_res = 4 (an offset of 1 everywhere), so r = 1
    np.testing.assert_allclose(mean_squared_error(net, est), [1.0, 1.0])
    np.testing.assert_allclose(coefficient_of_determination(net, est), [1 - 4 / 5, 0.0])
    # ADS: 1 - SSE / (n * SS_tot / (n - 1)) = 1 - 4 / (4 * 5 / 3) = 0.4; 1 - 4 / (4 * 4 / 3) = 0.25
    np.testing.assert_allclose(r2_ads(net, est), [0.4, 0.25])
    # r of image 0: centred est = (-2, -1, 0, 3); sum a*b = 3 + 0.5 + 0 + 4.5 = 8;
    # |a|^2 = 5, |b|^2 = 4 + 1 + 0 + 9 = 14 -> r = 8 / sqrt(70)
    np.testing.assert_allclose(pearson_r(net, est), [8 / np.sqrt(70), 1.0])
    np.testing.assert_allclose(compare(net, est)["r_squared"], [64 / 70, 1.0])
    # pooled: mean of all 8 pixels = 14 / 8 = 1.75; SS_tot = sum (x - 1.75)^2 over the 8
    # values 1,2,3,4,0,0,2,2 -> squares 0.5625, 0.0625, 1.5625, 5.0625, 3.0625, 3.0625, 0.0625, 0.0625 = 13.5
    # SS_res = 4 + 4 = 8 -> R2_pooled = 1 - 8 / 13.5
    assert pooled_r2(net, est) == pytest.approx(1 - 8 / 13.5, rel=1e-12)
    assert np.isnan(pooled_r2(np.ones((2, 1, 2, 2)), est))
    np.testing.assert_allclose(r2_ads(net, net), 1.0)
    assert beats_fraction([0.9, 0.5, np.nan, 0.7], [0.8, 0.5, 0.1, 0.1]) == {"wins": 2, "n": 3, "fraction": 2 / 3}


def test_bootstrap_pooled_r2_brackets_the_value():
    rng = np.random.default_rng(5)
    net = rng.normal(size=(30, 1, 3, 3))
    est = net + 0.5 * rng.normal(size=net.shape)
    out = bootstrap_pooled_r2(net, est, resamples=500)
    assert out["value"] == pytest.approx(pooled_r2(net, est)) and out["n"] == 30
    assert out["ci_low"] < out["value"] < out["ci_high"]
    assert bootstrap_pooled_r2(net, est, resamples=500) == out  # deterministic
    # the vectorised resample equals pooled_r2 of the resampled images
    idx = np.random.default_rng(0).integers(0, 30, size=(1, 30))[0]
    one = bootstrap_pooled_r2(net, est, resamples=1, level=0.5)
    assert one["ci_low"] == pytest.approx(pooled_r2(net[idx], est[idx]))


def test_bootstrap_is_deterministic_and_brackets_the_median():
    values = np.random.default_rng(2).normal(size=50)
    a = bootstrap_median(values)
    b = bootstrap_median(values)
    assert a == b and a["resamples"] == 10_000 and a["n"] == 50
    assert a["median"] == np.median(values)
    assert a["ci_low"] <= a["median"] <= a["ci_high"] and a["ci_low"] < a["ci_high"]
    assert bootstrap_median(values, seed=1) != a  # the seed matters
    const = bootstrap_median([0.5] * 7, resamples=100)
    assert const["median"] == const["ci_low"] == const["ci_high"] == 0.5
    with_nan = bootstrap_median([1.0, np.nan, 3.0], resamples=100)
    assert with_nan["n"] == 2 and with_nan["median"] == 2.0
    assert np.isnan(bootstrap_median([np.nan], resamples=10)["median"])


def test_nearest_training_images_brute_force():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(13, 1, 3, 3))
    queries = rng.normal(size=(4, 1, 3, 3))
    idx, dist = nearest_training_images(queries, train, chunk=5)
    d = np.linalg.norm(queries.reshape(4, 1, -1) - train.reshape(1, 13, -1), axis=2)  # [4, 13]
    assert idx.tolist() == d.argmin(1).tolist()
    np.testing.assert_allclose(dist, d.min(1), rtol=1e-12)


def test_summarize_fraction_and_rows():
    rng = np.random.default_rng(4)
    net = rng.normal(size=(4, 1, 3, 3))
    els = net + 0.1 * rng.normal(size=net.shape)
    ideal = rng.normal(size=net.shape)
    ideal[0] = net[0]  # seed 10: IS is perfect, so ELS does not beat it
    out = summarize({"network": net, "els": els, "ideal": ideal}, [10, 11, 12, 13], train_images=net[:2],
                    resamples=50)
    frac = out["fraction_machine_beats_baseline"]
    assert frac["wins"] == 3 and frac["n"] == 4 and frac["fraction"] == 0.75
    rows = out["per_seed"]
    assert [r["seed"] for r in rows] == [10, 11, 12, 13] and rows[0]["els_beats_ideal"] is False
    assert rows[0]["nearest_train_index"] == 0 and rows[0]["nearest_train_l2"] == 0.0
    assert set(out["aggregates"]) == {"els", "ideal", "nearest_train"}
    assert set(out["aggregates"]["els"]) == {"pearson_r", "r_squared", "R2", "R2_ads", "mse"}
    assert out["machine_beats"]["versus"]["ideal"] == {"wins": 3, "n": 4, "fraction": 0.75}
    assert out["pooled"]["els"]["R2_pooled"]["value"] == pytest.approx(pooled_r2(net, els))
    assert out["R2_ads_mean"]["els"] == pytest.approx(np.mean(r2_ads(net, els)))


# ------------------------------------------------------------------ command


def tiny_checkpoint(tmp_path, *, conditional=False):
    """An untrained tiny ResNet whose train config names a 6-image labelled .npz set."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    if not data.exists():
        np.savez(data, images=rng.integers(0, 256, (6, H, W), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    config = ResNetConfig(in_channels=1, image_size=H, width=4, depth=1, norm_groups=0,
                          num_classes=3 if conditional else 0)
    torch.manual_seed(0)
    path = tmp_path / ("cond.pt" if conditional else "model.pt")
    train = TrainConfig(dataset=str(data), n_train=6, image_size=None, conditional=conditional, model=config, steps=1)
    save_checkpoint(path, build_model(config), config, step=1, train_config=train.to_dict())
    return path, data


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.mark.parametrize("conditional", [False, True])
def test_evaluate_end_to_end(tmp_path, conditional):
    ckpt, data = tiny_checkpoint(tmp_path, conditional=conditional)
    out = tmp_path / "eval"
    seeds = [0, 1, 2, 3, 4]
    result = ok("evaluate", "--model", ckpt, "--patch-sizes", "3,5", "--seeds", "0-4", "--out", out,
                "--bootstrap-resamples", 200, "--batch-size", 2, "--network-steps", 2)
    assert "ELS beats IS on" in result.output and "median r" in result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["comparison.png", "metrics.json", "samples_els.npz", "samples_ideal.npz",
                     "samples_network.npz", "scatter.png"]
    for png in ("comparison.png", "scatter.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_seeds"] == 5 and len(metrics["per_seed"]) == 5
    assert metrics["config"]["training_set"]["n_train"] == 6 and metrics["config"]["patch_sizes"] == [3, 5]
    assert metrics["config"]["steps"] == 2 and metrics["config"]["network_steps"] == 2
    for name in ("els", "ideal"):
        assert metrics["aggregates"][name]["pearson_r"]["resamples"] == 200
    labels = [s % 3 for s in seeds] if conditional else None
    assert metrics["config"]["labels"] == labels
    # the archives are what the library computes from the same noise
    denoiser = load_denoiser(ckpt)
    noise = noise_for_seeds(seeds, (1, H, W))
    lab = None if labels is None else torch.tensor(labels)
    images = load_dataset(str(data), size=None)
    network = load_samples(out / "samples_network.npz")
    assert network["seeds"].tolist() == seeds
    assert (network.get("labels") is None) == (not conditional)
    expected = torch.cat([sample(denoiser, noise[i : i + 2], steps=2, label=None if lab is None else lab[i : i + 2])
                          for i in range(0, 5, 2)])
    np.testing.assert_array_equal(network["images"], expected.numpy())
    machine = ScoreMachine(images.images, kind="els", padding="zeros", labels=images.labels if conditional else None)
    els = sample(machine, noise, steps=2, patch_sizes=[3, 5], label=lab)
    np.testing.assert_allclose(load_samples(out / "samples_els.npz")["images"], els.numpy(), atol=1e-5)  # float32
    row = metrics["per_seed"][0]
    r = np.corrcoef(network["images"][0].ravel(), load_samples(out / "samples_els.npz")["images"][0].ravel())[0, 1]
    assert row["pearson_r_els"] == pytest.approx(r, abs=1e-6)
    assert row["r_squared_els"] == pytest.approx(r**2, abs=1e-6)


def test_evaluate_defaults_to_the_papers_150_network_steps(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    out = tmp_path / "eval"
    ok("evaluate", "--model", ckpt, "--patch-sizes", "3,5", "--seeds", "0-1", "--out", out,
       "--bootstrap-resamples", 20)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["network_steps"] == 150 and metrics["config"]["steps"] == 2
    noise = noise_for_seeds([0, 1], (1, H, W))
    expected = sample(load_denoiser(ckpt), noise, steps=150)
    np.testing.assert_allclose(load_samples(out / "samples_network.npz")["images"], expected.numpy(), atol=1e-6)


def test_evaluate_machine_steps_apart_from_the_schedule_length(tmp_path):
    """A 4-entry schedule run on a 2-step grid: each step takes k at its sigma; reuse checks those sizes."""
    ckpt, data = tiny_checkpoint(tmp_path)
    schedule = PatchSchedule((3, 3, 5, 5))  # keyed to the 4-step cosine grid
    schedule.save(tmp_path / "k.json")
    prev = tmp_path / "prev"
    ok("sample", "--like", ckpt, "--patch-sizes", tmp_path / "k.json", "--steps", 2, "--seeds", "0-1", "--out", prev)
    out = tmp_path / "eval"
    ok("evaluate", "--model", ckpt, "--patch-sizes", tmp_path / "k.json", "--steps", 2, "--network-steps", 3,
       "--seeds", "0-1", "--out", out, "--reuse", prev, "--bootstrap-resamples", 20)
    cfg = json.loads((out / "metrics.json").read_text())["config"]
    on_grid = list(schedule.on_grid(sigmas_cosine(2)))[::-1]
    assert cfg["steps"] == 2 and cfg["patch_sizes"] == on_grid and cfg["schedule"]["sizes"] == [3, 3, 5, 5]
    images = load_dataset(str(data), size=None).images
    els = sample_seeds(ScoreMachine(images, kind="els", padding="zeros").bind(patch_sizes=schedule), [0, 1], (1, H, W),
                       sigmas=sigmas_cosine(2))
    np.testing.assert_allclose(load_samples(out / "samples_els.npz")["images"], els.numpy(), atol=1e-5)
    # the same samples do not pass for the schedule's own 4 steps
    refused = invoke("evaluate", "--model", ckpt, "--patch-sizes", tmp_path / "k.json", "--seeds", "0-1",
                     "--out", tmp_path / "e4", "--reuse", prev)
    assert refused.exit_code == 2 and "steps is 2, expected 4" in refused.output


def test_evaluate_reuses_a_matching_sample_run(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    prev = tmp_path / "prev"
    ok("sample", "--like", ckpt, "--patch-sizes", "3,5", "--seeds", "0-5", "--out", prev)
    out = tmp_path / "eval"
    ok("evaluate", "--model", ckpt, "--patch-sizes", "3,5", "--seeds", "4,1", "--out", out, "--reuse", prev,
       "--bootstrap-resamples", 50)
    reused = load_samples(out / "samples_els.npz")
    previous = load_samples(prev)
    assert reused["seeds"].tolist() == [4, 1]
    np.testing.assert_array_equal(reused["images"], previous["images"][[4, 1]])
    assert json.loads((out / "metrics.json").read_text())["config"]["seconds_per_seed"]["els"] is None


@pytest.mark.parametrize(
    ("sample_args", "eval_args", "fragments"),
    [
        (["--patch-sizes", "3,3"], ["--seeds", "0-1"], ["patch_sizes is [3, 3], expected [3, 5]"]),
        (["--patch-sizes", "3,5"], ["--seeds", "0-3"], ["seeds [2, 3] are missing"]),
        (["--patch-sizes", "3,5", "--n-train", "5"], ["--seeds", "0-1"], ["n_train is 5, expected 6"]),
        (["--patch-sizes", "3,5", "--padding", "circular"], ["--seeds", "0-1"], ["padding is 'circular'"]),
        (["--patch-sizes", "3,5", "--dtype", "float64"], ["--seeds", "0-1"], ["dtype is 'float64'"]),
        (["--patch-sizes", "3,5", "--machine", "ls"], ["--seeds", "0-1"], ["holds 'ls' samples"]),
    ],
)
def test_evaluate_reuse_validation(tmp_path, sample_args, eval_args, fragments):
    ckpt, data = tiny_checkpoint(tmp_path)
    prev = tmp_path / "prev"
    ok("sample", "--dataset", data, "--size", "native", "--steps", "2", "--seeds", "0-1", *sample_args, "--out", prev)
    out = tmp_path / "eval"
    result = invoke("evaluate", "--model", ckpt, "--patch-sizes", "3,5", *eval_args, "--out", out, "--reuse", prev)
    assert result.exit_code != 0 and "Traceback" not in result.output, result.output
    for fragment in ("--reuse", *fragments):
        assert fragment in result.output, result.output
    assert not out.exists()


def test_evaluate_reuse_of_network_run_and_missing_dir(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    net = tmp_path / "net"
    ok("sample", "--model", ckpt, "--steps", "2", "--seeds", "0-1", "--out", net)
    result = invoke("evaluate", "--model", ckpt, "--patch-sizes", "3,5", "--seeds", "0-1", "--out",
                    tmp_path / "e", "--reuse", net)
    assert result.exit_code != 0 and "holds 'network' samples" in result.output
    result = invoke("evaluate", "--model", ckpt, "--patch-sizes", "3,5", "--out", tmp_path / "e", "--reuse",
                    tmp_path / "nowhere")
    assert result.exit_code != 0 and "does not exist" in result.output


def test_evaluate_refuses_non_empty_out_and_needs_a_schedule(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    out = tmp_path / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = invoke("evaluate", "--model", ckpt, "--patch-sizes", "3,5", "--out", out)
    assert result.exit_code != 0 and "not empty" in result.output and "--overwrite" in result.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    result = invoke("evaluate", "--model", ckpt, "--out", tmp_path / "e2")
    assert result.exit_code != 0 and "has no schedule.json" in result.output
    result = invoke("evaluate", "--model", ckpt, "--patch-sizes", "3,4", "--out", tmp_path / "e3")
    assert result.exit_code != 0 and "must be odd" in result.output and "Traceback" not in result.output


def test_evaluate_overwrite_refuses_samples_of_another_machine(tmp_path):
    ckpt, _ = tiny_checkpoint(tmp_path)
    out = tmp_path / "eval"
    common = ("--model", ckpt, "--patch-sizes", "3,5", "--seeds", "0-1", "--network-steps", 2, "--out", out,
              "--bootstrap-resamples", 20)
    ok("evaluate", *common)
    ok("evaluate", *common, "--overwrite")  # the same machine: its files are replaced
    refused = invoke("evaluate", *common, "--machine", "ls", "--overwrite")
    assert refused.exit_code == 2 and "samples_els.npz" in refused.output and "Move or delete" in refused.output
    assert sorted(p.name for p in out.iterdir()) == ["comparison.png", "metrics.json", "samples_els.npz",
                                                     "samples_ideal.npz", "samples_network.npz", "scatter.png"]


def test_evaluate_workers_split_both_machines(tmp_path, monkeypatch):
    """--workers 2: ELS and IS split their batches between two threads, sample what one stream samples,
    and the config records it."""
    seen = []
    split = ScoreMachine._in_workers

    def spy(self, x, *a, **kw):
        seen.append((self.kind, self.workers))
        return split(self, x, *a, **kw)

    monkeypatch.setattr(ScoreMachine, "_in_workers", spy)
    ckpt, data = tiny_checkpoint(tmp_path)
    out = tmp_path / "eval"
    ok("evaluate", "--model", ckpt, "--patch-sizes", "3,5", "--seeds", "0-3", "--out", out,
       "--bootstrap-resamples", 50, "--network-steps", 2, "--workers", 2)
    assert json.loads((out / "metrics.json").read_text())["config"]["workers"] == 2
    assert set(seen) == {("els", 2), ("ideal", 2)}
    images = load_dataset(str(data), size=None).images
    noise = noise_for_seeds([0, 1, 2, 3], (1, H, W))
    for kind, sizes in (("els", [3, 5]), ("ideal", None)):
        machine = ScoreMachine(images, kind=kind, padding="zeros")
        want = sample(machine, noise, steps=2, patch_sizes=sizes)
        np.testing.assert_allclose(load_samples(out / f"samples_{kind}.npz")["images"], want.numpy(), atol=1e-5)
