"""The ``patchmosaic sample`` command, on a tiny .npz training set written here."""

import importlib.util
import json
import subprocess
import sys
from importlib import resources

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import patchmosaic
from patchmosaic.cli import main
from patchmosaic.runs import load_samples

N, H, W = 6, 8, 8
FAST = ["--size", "native", "--patch-sizes", "3,3", "--steps", "2"]


@pytest.fixture
def tiny(tmp_path):
    """6 labelled 8x8 grayscale images (classes 0, 1, 2) as an .npz dataset."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, images=rng.integers(0, 256, (N, H, W), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    return path


@pytest.fixture
def tiny_unlabelled(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=rng.integers(0, 256, (N, H, W), dtype=np.uint8))
    return path


def run(*args):
    """Invoke ``patchmosaic sample ARGS`` in-process."""
    return CliRunner().invoke(main, ["sample", *map(str, args)])


def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def assert_clean_error(result, *fragments):
    """Non-zero exit, an ``Error: ...`` message and no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert "Error:" in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def test_writes_all_files(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["--dataset", str(tiny), *FAST, "--seeds", "0-4", "--out", str(out), "--label", "2"]
    monkeypatch.setattr(sys, "argv", ["patchmosaic", "sample", *args])  # what the shell would pass
    result = ok(*args)
    assert f"wrote 5 samples to {out}" in result.stdout and "s/sample" in result.stdout
    data = load_samples(out / "samples.npz")
    assert data["images"].shape == (5, 1, H, W) and data["images"].dtype == np.float32
    assert np.abs(data["images"]).max() <= 1.0 + 1e-6
    assert data["seeds"].tolist() == [0, 1, 2, 3, 4]
    assert data["labels"].tolist() == [2] * 5
    with Image.open(out / "grid.png") as im:
        assert im.size == (5 * (W * 4 + 1) + 1, H * 4 + 2) and im.mode == "L"
    config = json.loads((out / "config.json").read_text())
    assert config["image_shape"] == [1, H, W] and config["n_train"] == N
    assert config["machine"] == "els" and config["padding"] == "zeros"
    assert config["patch_sizes"] == [3, 3] and config["patch_sizes_source"] == "explicit"
    assert config["steps"] == 2 and config["seeds"] == [0, 1, 2, 3, 4] and config["label"] == 2
    assert config["dtype"] == "float32" and "manual_seed(seed)" in config["noise_rule"]
    assert config["wall_time_s"] >= 0 and config["patchmosaic_version"] == patchmosaic.__version__
    assert config["command"] == "patchmosaic sample " + " ".join(args)


def test_samples_match_library_from_documented_noise(tiny, tmp_path):
    """The CLI is the library: same machine, bind and noise_for_seed(s)."""
    ok("--dataset", tiny, *FAST, "--seeds", "3,1", "--out", tmp_path / "run")
    from patchmosaic.data import load_dataset

    data = load_dataset(str(tiny), size=None)
    machine = patchmosaic.ScoreMachine(data.images, kind="els", padding="zeros")
    noise = torch.stack(
        [torch.randn((1, H, W), generator=torch.Generator("cpu").manual_seed(s)) for s in (3, 1)]
    )  # [2, 1, H, W]
    expected = patchmosaic.sample(machine, noise, steps=2, patch_sizes=[3, 3])
    np.testing.assert_array_equal(load_samples(tmp_path / "run")["images"], expected.numpy())


def test_same_seeds_same_samples_across_runs_and_batch_sizes(tiny, tmp_path):
    args = ["--dataset", tiny, *FAST, "--seeds", "0-4"]
    ok(*args, "--out", tmp_path / "a", "--batch-size", 8)
    ok(*args, "--out", tmp_path / "b", "--batch-size", 8)
    ok(*args, "--out", tmp_path / "c", "--batch-size", 2)
    ok(*args, "--out", tmp_path / "d", "--batch-size", 1)
    a = load_samples(tmp_path / "a")["images"]
    for other in "bcd":
        np.testing.assert_array_equal(load_samples(tmp_path / other)["images"], a)
    # a subset of the seeds gives the same images for those seeds
    ok("--dataset", tiny, *FAST, "--seeds", "3", "--out", tmp_path / "e")
    np.testing.assert_array_equal(load_samples(tmp_path / "e")["images"][0], a[3])


def test_batch_size_invariance_with_several_chunks(tiny, tmp_path):
    args = ["--dataset", tiny, *FAST, "--seeds", "0-4", "--chunk-elements", 2000]
    ok(*args, "--out", tmp_path / "a", "--batch-size", 5)
    ok(*args, "--out", tmp_path / "b", "--batch-size", 1)
    a, b = (load_samples(tmp_path / d)["images"] for d in "ab")
    # chunking does not depend on the batch; BLAS blocking of different shapes may still round differently
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (extra 'gpu')")
def test_kernel_flags_choose_the_fused_kernel_or_the_engine(tiny, tmp_path, monkeypatch):
    """--kernel triton (Triton's CPU interpreter here: tests/conftest.py sets TRITON_INTERPRET=1) and
    --kernel torch give the same samples; flags the kernel cannot serve are clean errors."""
    from patchmosaic import kernels

    precisions = []
    fused_call = kernels.fused_softmax_mean

    def spy(*a, **kw):
        precisions.append(kw["precision"])
        return fused_call(*a, **kw)

    monkeypatch.setattr(kernels, "fused_softmax_mean", spy)
    args = ["--dataset", tiny, *FAST, "--seeds", "0-1", "--chunk-elements", 2000]
    ok(*args, "--out", tmp_path / "fused", "--kernel", "triton", "--kernel-precision", "ieee")
    assert precisions and set(precisions) == {"ieee"}
    fused_calls = len(precisions)
    ok(*args, "--out", tmp_path / "engine", "--kernel", "torch")
    assert len(precisions) == fused_calls  # the engine run made no kernel call
    fused, engine = (load_samples(tmp_path / d)["images"] for d in ("fused", "engine"))
    np.testing.assert_allclose(fused, engine, rtol=0, atol=1e-5)
    assert_clean_error(run(*args, "--out", tmp_path / "x", "--kernel", "triton", "--dtype", "float64"),
                       "float32 on CUDA", "--dtype float64")
    assert_clean_error(run(*args, "--out", tmp_path / "y", "--kernel", "triton", "--provenance"), "--provenance")
    assert_clean_error(run(*args, "--out", tmp_path / "z", "--kernel", "triton", "--machine", "ideal",
                           "--patch-sizes", "none"), "LS and ELS")


@pytest.mark.parametrize(
    "extra",
    [
        ["--machine", "ideal", "--patch-sizes", None],
        ["--machine", "es", "--padding", "circular", "--patch-sizes", None],
        ["--machine", "ls", "--padding", "circular"],
        ["--machine", "els", "--padding", "circular", "--no-wrap-training-patches", "--dtype", "float64"],
    ],
)
def test_every_machine_runs(tiny, tmp_path, extra):
    args = ["--dataset", tiny, *FAST, "--seeds", "0-1", "--out", tmp_path / "run"]
    if "--patch-sizes" in extra:  # drop the schedule for machines without patches
        i = args.index("--patch-sizes")
        del args[i : i + 2]
        extra = extra[:-2]
    ok(*args, *extra)
    assert load_samples(tmp_path / "run")["images"].shape == (2, 1, H, W)


def test_refuses_non_empty_out_and_leaves_it_untouched(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "samples.npz").write_bytes(b"old")
    result = run("--dataset", tiny, *FAST, "--out", out)
    assert_clean_error(result, "not empty", "--overwrite", "--out")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "samples.npz"]
    assert (out / "samples.npz").read_bytes() == b"old"
    assert "sampling" not in result.output  # refused before any work


def test_overwrite_replaces_run_files_and_keeps_others(tiny, tmp_path):
    out = tmp_path / "run"
    ok("--dataset", tiny, *FAST, "--seeds", "0-2", "--out", out)
    (out / "notes.txt").write_text("mine")
    ok("--dataset", tiny, *FAST, "--seeds", "5-6", "--out", out, "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    assert load_samples(out)["seeds"].tolist() == [5, 6]
    assert json.loads((out / "config.json").read_text())["seeds"] == [5, 6]


def test_failed_validation_creates_no_out_dir(tiny, tmp_path):
    out = tmp_path / "never"
    assert_clean_error(run("--dataset", tiny, *FAST, "--label", 7, "--out", out), "--label")
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--patch-sizes", "3,4", "--steps", "2"], ["--patch-sizes", "must be odd", "4"]),
        (["--patch-sizes", "no-such-preset"], ["unknown patch-size schedule", "mnist-resnet-zeros"]),
        (["--patch-sizes", "missing.json"], ["schedule file not found"]),
        (["--patch-sizes", "3,5,99", "--steps", "3"], ["patch size 99 is larger than the", "image"]),
        (["--steps", "2"], ["--machine els needs a locality schedule"]),
        (["--machine", "ideal", "--patch-sizes", "3,3", "--steps", "2"], ["has no patches"]),
        (["--machine", "es", "--steps", "2"], ["circular padding only"]),
        (["--patch-sizes", "3,3", "--steps", "2", "--no-wrap-training-patches"], ["only applies to"]),
        (["--patch-sizes", "3,3", "--steps", "2", "--seeds", "3-1"], ["--seeds", "reversed"]),
        (["--patch-sizes", "3,3", "--steps", "2", "--seeds", "0,0"], ["repeats seed"]),
        (["--patch-sizes", "3,3", "--steps", "2", "--label", "5"], ["--label", "class 5 does not occur", "[0, 1, 2]"]),
        (["--patch-sizes", "3,3", "--steps", "2", "--n-train", "7"], ["n_train must be in 1..6"]),
        (["--patch-sizes", "21,21", "--steps", "2", "--padding", "circular"], ["too large"]),
        (["--patch-sizes", "3,3", "--steps", "2", "--size", "0"], ["--size"]),
        (["--patch-sizes", "3,3", "--steps", "2", "--dtype", "float16"], ["--dtype"]),
    ],
)
def test_bad_inputs_give_clean_errors(tiny, tmp_path, args, fragments):
    out = tmp_path / "run"
    assert_clean_error(run("--dataset", tiny, "--size", "native", *args, "--out", out), *fragments)
    assert not out.exists()


def test_presets_and_lists_apply_at_any_step_count(tiny, tmp_path):
    """A schedule is keyed by sigma, so a preset or an n-entry list runs with any --steps."""
    ok("--dataset", tiny, "--size", "native", "--patch-sizes", "3,3", "--steps", "3", "--seeds", "0",
       "--out", tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["patch_sizes"] == [3, 3, 3] and config["steps"] == 3


def test_label_on_unlabelled_data(tiny_unlabelled, tmp_path):
    result = run("--dataset", tiny_unlabelled, *FAST, "--label", 0, "--out", tmp_path / "run")
    assert_clean_error(result, "--label", "has no labels")


def test_missing_dataset_path(tmp_path):
    result = run("--dataset", tmp_path / "nowhere.npz", *FAST, "--out", tmp_path / "run")
    assert_clean_error(result, "dataset path not found", "nowhere.npz")


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and patchmosaic.__version__ in result.output


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "patchmosaic", "sample", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--dataset", "--machine", "--padding", "--patch-sizes", "--n-train", "--seeds", "--out",
                 "--label", "--steps", "--overwrite", "--batch-size", "--dtype",
                 "--no-wrap-training-patches", "--chunk-elements"):
        assert flag in proc.stdout
    assert "manual_seed(s)" in proc.stdout


def _bundled_mnist_missing() -> str | None:
    path = resources.files("patchmosaic.data").joinpath("bundled", "mnist.npz")
    if not path.is_file():
        return f"bundled MNIST file missing at {path}"
    if path.stat().st_size < 1_000_000:
        return f"bundled MNIST file at {path} is only {path.stat().st_size} bytes (a Git LFS pointer?)"
    return None


@pytest.mark.skipif(_bundled_mnist_missing() is not None, reason=str(_bundled_mnist_missing()))
def test_bundled_mnist(tmp_path):
    out = tmp_path / "mnist"
    ok("--dataset", "mnist", "--n-train", 20, "--steps", 2, "--patch-sizes", "3,5", "--seeds", "0-1",
       "--out", out, "--label", 3)
    data = load_samples(out)
    assert data["images"].shape == (2, 1, 32, 32)
    config = json.loads((out / "config.json").read_text())
    assert config["n_train"] == 20 and config["image_shape"] == [1, 32, 32] and config["label_name"] == "3"


# ---------------------------------------------------------------- --model and --like


def _tiny_checkpoint(tmp_path, dataset, *, conditional):
    """An untrained tiny ResNet trained (per its config) on the 6-image ``dataset``, with a schedule.json."""
    from patchmosaic.checkpoints import save_checkpoint
    from patchmosaic.models import ResNetConfig, build_model
    from patchmosaic.training import TrainConfig

    config = ResNetConfig(in_channels=1, image_size=H, width=4, depth=1, norm_groups=0,
                          num_classes=3 if conditional else 0)
    torch.manual_seed(0)
    run = tmp_path / ("cond-run" if conditional else "run-model")
    run.mkdir()
    train = TrainConfig(dataset=str(dataset), n_train=5, image_size=None, conditional=conditional, model=config,
                        steps=1)
    save_checkpoint(run / "model.pt", build_model(config), config, step=1, train_config=train.to_dict())
    patchmosaic.PatchSchedule((3, 5, 3)).save(run / "schedule.json")
    return run


@pytest.mark.parametrize("conditional", [False, True])
def test_sample_model_equals_library(tiny, tmp_path, conditional):
    from patchmosaic.checkpoints import load_denoiser

    run = _tiny_checkpoint(tmp_path, tiny, conditional=conditional)
    out = tmp_path / "net"
    result = ok("--model", run, "--steps", 3, "--seeds", "4,0,2", "--out", out)
    assert "network samples" in result.output
    data = load_samples(out)
    labels = [4 % 3, 0, 2] if conditional else None
    noise = patchmosaic.noise_for_seeds([4, 0, 2], (1, H, W))
    expected = patchmosaic.sample(load_denoiser(run / "model.pt"), noise, steps=3,
                                  label=None if labels is None else torch.tensor(labels))
    np.testing.assert_array_equal(data["images"], expected.numpy())
    assert data["seeds"].tolist() == [4, 0, 2]
    assert (data.get("labels") is None and labels is None) or data["labels"].tolist() == labels
    config = json.loads((out / "config.json").read_text())
    assert config["denoiser"] == "network" and config["model_checkpoint"] == str(run / "model.pt")
    assert config["labels"] == labels and config["steps"] == 3
    assert (out / "grid.png").is_file()


def test_sample_model_label_override_and_errors(tiny, tmp_path):
    cond = _tiny_checkpoint(tmp_path, tiny, conditional=True)
    uncond = _tiny_checkpoint(tmp_path, tiny, conditional=False)
    ok("--model", cond, "--steps", 1, "--seeds", "0-2", "--label", 1, "--out", tmp_path / "a")
    assert load_samples(tmp_path / "a")["labels"].tolist() == [1, 1, 1]
    assert_clean_error(run("--model", uncond, "--label", 1, "--out", tmp_path / "b"), "unconditional")
    assert_clean_error(run("--model", cond, "--label", 3, "--out", tmp_path / "b"), "out of range")
    assert_clean_error(run("--model", uncond, "--dataset", tiny, "--out", tmp_path / "b"), "--dataset", "do not apply")
    assert_clean_error(run("--model", uncond, "--patch-sizes", "3", "--out", tmp_path / "b"), "--patch-sizes")
    assert_clean_error(run("--model", uncond, "--like", uncond, "--out", tmp_path / "b"), "exclude each other")
    assert_clean_error(run("--model", tmp_path / "nope", "--out", tmp_path / "b"), "neither a checkpoint")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("conditional", [False, True])
def test_like_takes_the_models_setting(tiny, tmp_path, conditional):
    from patchmosaic.data import load_dataset

    run_dir = _tiny_checkpoint(tmp_path, tiny, conditional=conditional)
    out = tmp_path / "like"
    ok("--like", run_dir, "--seeds", "0-3", "--out", out, "--batch-size", 3)
    config = json.loads((out / "config.json").read_text())
    assert config["n_train"] == 5 and config["padding"] == "zeros" and config["size"] == "native"
    assert config["patch_sizes"] == [3, 5, 3] and config["steps"] == 3 and config["machine"] == "els"
    assert config["like"] == str(run_dir / "model.pt")
    labels = [0, 1, 2, 0] if conditional else None
    assert config.get("labels") == labels
    data = load_dataset(str(tiny), n_train=5, size=None)
    machine = patchmosaic.ScoreMachine(data.images, kind="els", padding="zeros", labels=data.labels)
    noise = patchmosaic.noise_for_seeds(range(4), (1, H, W))
    expected = patchmosaic.sample(machine, noise, steps=3, patch_sizes=[3, 5, 3],
                                  label=None if labels is None else torch.tensor(labels))
    np.testing.assert_allclose(load_samples(out)["images"], expected.numpy(), atol=1e-6)
    # --patch-sizes overrides the model's schedule
    ok("--like", run_dir, "--patch-sizes", "3,3", "--seeds", "0", "--out", tmp_path / "like2")
    assert json.loads((tmp_path / "like2" / "config.json").read_text())["patch_sizes"] == [3, 3]


def test_like_errors(tiny, tmp_path):
    run_dir = _tiny_checkpoint(tmp_path, tiny, conditional=False)
    assert_clean_error(run("--like", run_dir, "--machine", "ideal", "--out", tmp_path / "x"), "--like", "ideal")
    assert_clean_error(run("--like", run_dir, "--dataset", tiny, "--out", tmp_path / "x"), "drop --dataset")
    assert_clean_error(run("--like", run_dir, "--n-train", 3, "--out", tmp_path / "x"), "--n-train")
    assert_clean_error(run("--like", run_dir, "--label", 1, "--out", tmp_path / "x"), "unconditional", "--label")
    (run_dir / "schedule.json").unlink()
    assert_clean_error(run("--like", run_dir, "--out", tmp_path / "x"), "has no schedule.json", "--patch-sizes")
    assert_clean_error(run("--like", "pretrained:no-such-model", "--out", tmp_path / "x"), "unknown pretrained model")
    assert not (tmp_path / "x").exists()


def test_patch_sizes_pretrained_prefix(tiny, tmp_path, monkeypatch):
    root = tmp_path / "pre"
    (root / "m").mkdir(parents=True)
    run_dir = _tiny_checkpoint(tmp_path, tiny, conditional=False)
    for name in ("model.pt", "schedule.json"):
        (root / "m" / name).write_bytes((run_dir / name).read_bytes())
    monkeypatch.setenv("PATCHMOSAIC_PRETRAINED_DIR", str(root))
    ok("--dataset", tiny, "--size", "native", "--patch-sizes", "pretrained:m", "--steps", 3, "--seeds", "0",
       "--out", tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["patch_sizes"] == [3, 5, 3]
    ok("--model", "m", "--steps", 1, "--seeds", "0", "--out", tmp_path / "q")  # bare pretrained name
    assert json.loads((tmp_path / "q" / "config.json").read_text())["model"] == "pretrained:m"
    assert_clean_error(run("--dataset", tiny, "--patch-sizes", "pretrained:zz", "--out", tmp_path / "r"),
                       "unknown pretrained model 'zz'", "available: m")


def test_non_square_images_name_the_cli_flag(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "wide.npz"
    np.savez(path, images=rng.integers(0, 256, (4, 6, 9), dtype=np.uint8))
    result = run("--dataset", path, "--machine", "ideal", "--steps", "2", "--out", tmp_path / "run")
    assert_clean_error(result, "6x9, not square", "--size native")
    assert not (tmp_path / "run").exists()
    ok("--dataset", path, "--size", "native", "--machine", "ideal", "--steps", "2", "--seeds", "0",
       "--out", tmp_path / "native")
