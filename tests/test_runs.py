"""Run-directory IO: seed lists, run directories, grids, sample archives, configs."""

import json
import shlex
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import patchmosaic
from patchmosaic.runs import (
    check_run_dir,
    format_seeds,
    load_samples,
    parse_seeds,
    prepare_run_dir,
    save_grid,
    save_samples,
    write_config,
)

# ------------------------------------------------------------------ parse_seeds


@pytest.mark.parametrize(
    ("spec", "seeds"),
    [
        ("0-7", list(range(8))),
        ("0,3,5", [0, 3, 5]),
        ("0-3,10,12-13", [0, 1, 2, 3, 10, 12, 13]),
        ("5", [5]),
        ("4-4", [4]),
        (" 1 - 2 , 9 ", [1, 2, 9]),
        ("9,2", [9, 2]),  # order is kept
    ],
)
def test_parse_seeds(spec, seeds):
    assert parse_seeds(spec) == seeds
    text = format_seeds(seeds)
    assert text.endswith(f" ({len(seeds)})") and parse_seeds(text.rsplit(" (", 1)[0]) == seeds  # round trip


def test_format_seeds():
    assert format_seeds([1000, 1001, 1002, 5, 7, 8]) == "1000-1002, 5, 7-8 (6)"
    assert format_seeds([3]) == "3 (1)"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("", "empty seed list"),
        ("   ", "empty seed list"),
        ("0,,3", "empty item"),
        ("1,", "empty item"),
        ("-1", "non-negative"),
        ("0--3", "non-negative"),
        ("3,-2", "non-negative"),
        ("5-3", "reversed seed range"),
        ("0-3,2", r"repeats seed\(s\) \[2\]"),
        ("1,1", r"repeats seed\(s\) \[1\]"),
        ("a", "cannot parse 'a'"),
        ("1.5", "cannot parse"),
        ("1-2-3", "cannot parse"),
    ],
)
def test_parse_seeds_rejects(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_seeds(spec)


# -------------------------------------------------------------- run directories


def test_prepare_run_dir_creates_nested(tmp_path):
    out = prepare_run_dir(tmp_path / "a" / "b", overwrite=False)
    assert out.is_dir() and out == tmp_path / "a" / "b"


def test_prepare_run_dir_accepts_empty_existing(tmp_path):
    assert prepare_run_dir(tmp_path, overwrite=False) == tmp_path


def test_prepare_run_dir_refuses_non_empty_and_touches_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--overwrite.*--out") as info:
        prepare_run_dir(tmp_path, overwrite=False)
    assert str(tmp_path) in str(info.value)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_prepare_run_dir_overwrite_keeps_files(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    prepare_run_dir(tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_run_dir_refuses_a_file(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        prepare_run_dir(f, overwrite=True)


def test_check_run_dir_creates_nothing(tmp_path):
    check_run_dir(tmp_path / "new", overwrite=False)
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------- grid


@pytest.mark.parametrize(("B", "C", "nrow", "rows", "cols"), [(5, 1, 3, 2, 3), (2, 3, 8, 1, 2), (8, 1, 8, 1, 8)])
def test_save_grid_size_and_mode(tmp_path, B, C, nrow, rows, cols):
    H, W, scale = 6, 5, 3
    images = torch.rand(B, C, H, W) * 2 - 1  # [B, C, H, W]
    path = tmp_path / "grid.png"
    save_grid(images, path, nrow=nrow, scale=scale)
    with Image.open(path) as im:
        assert im.size == (cols * (W * scale + 1) + 1, rows * (H * scale + 1) + 1)
        assert im.mode == ("L" if C == 1 else "RGB")


def test_save_grid_pixels_clip_and_nearest(tmp_path):
    images = torch.tensor([[[[-2.0, 1.5], [0.0, -1.0]]]])  # [1, 1, 2, 2], values outside [-1, 1] clip
    save_grid(images, tmp_path / "g.png", scale=2, pad_value=-1.0)
    arr = np.asarray(Image.open(tmp_path / "g.png"))  # [6, 6]
    expected = np.array([[0, 255], [128, 0]], dtype=np.uint8).repeat(2, 0).repeat(2, 1)
    np.testing.assert_array_equal(arr[1:5, 1:5], expected)
    assert (arr[0] == 0).all() and (arr[:, 0] == 0).all()  # padding


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.zeros(2, 2, 4, 4), "1 \\(grayscale\\) or 3 \\(RGB\\) channels"),
        (torch.zeros(2, 4, 4), r"\[B, C, H, W\]"),
        (torch.full((1, 1, 2, 2), float("nan")), "NaN"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.int64), "floating point"),
    ],
)
def test_save_grid_rejects(tmp_path, images, match):
    with pytest.raises(ValueError, match=match):
        save_grid(images, tmp_path / "g.png")


# ---------------------------------------------------------------------- samples


def test_samples_round_trip(tmp_path):
    images = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 2 - 1  # [3, 1, 4, 4]
    path = tmp_path / "samples.npz"
    save_samples(path, images, [4, 0, 9], labels=[2, 2, 2])
    data = load_samples(path)
    assert set(data) == {"images", "seeds", "labels"}
    assert data["images"].dtype == np.float32 and data["images"].shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(data["images"], images.float().numpy())
    assert data["seeds"].dtype == np.int64 and data["seeds"].tolist() == [4, 0, 9]
    assert data["labels"].dtype == np.int64 and data["labels"].tolist() == [2, 2, 2]
    np.testing.assert_array_equal(load_samples(tmp_path)["seeds"], data["seeds"])  # run dir accepted


def test_samples_without_labels(tmp_path):
    save_samples(tmp_path / "s.npz", torch.zeros(2, 3, 2, 2), [0, 1])
    assert set(load_samples(tmp_path / "s.npz")) == {"images", "seeds"}


def test_save_samples_rejects_mismatch(tmp_path):
    with pytest.raises(ValueError, match="3 seeds for 2 images"):
        save_samples(tmp_path / "s.npz", torch.zeros(2, 1, 2, 2), [0, 1, 2])
    with pytest.raises(ValueError, match="labels must be 2 integers"):
        save_samples(tmp_path / "s.npz", torch.zeros(2, 1, 2, 2), [0, 1], labels=[0])


def test_load_samples_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples file not found"):
        load_samples(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="samples.npz"):
        load_samples(tmp_path)


def test_load_samples_missing_keys(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((1, 1, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"missing key\(s\) \['seeds'\]"):
        load_samples(tmp_path / "bad.npz")


def test_load_samples_not_npz(tmp_path):
    (tmp_path / "bad.npz").write_text("hello")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_samples(tmp_path / "bad.npz")


# ----------------------------------------------------------------------- config


def test_write_config(tmp_path):
    path = tmp_path / "config.json"
    write_config(path, {"b": 1, "a": [1, 2]}, argv=["patchmosaic", "sample", "--out", "x y"])
    text = path.read_text()
    data = json.loads(text)
    assert data["a"] == [1, 2] and data["b"] == 1
    assert data["patchmosaic_version"] == patchmosaic.__version__
    assert data["torch_version"] == torch.__version__
    assert data["command"] == "patchmosaic sample --out 'x y'"
    assert "T" in data["timestamp"]
    assert list(data) == sorted(data)  # sorted keys
    assert text.startswith('{\n  "a"')  # indent 2


def test_write_config_default_argv_and_reserved(tmp_path):
    data = write_config(tmp_path / "c.json", {})
    assert data["command"] == shlex.join(sys.argv)
    with pytest.raises(ValueError, match="reserved"):
        write_config(tmp_path / "c.json", {"timestamp": 0})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        write_config(tmp_path / "c.json", {"x": object()})


def test_sampling_setup_round_trips_and_reads_older_configs():
    from patchmosaic.runs import SamplingSetup
    from patchmosaic.schedules import sigmas_karras

    setup = SamplingSetup(steps=18, sampler="heun", grid="karras", dtype="float64")
    config = setup.to_config()
    assert config["sigmas"] == sigmas_karras(18).tolist() and config["time_grid"] is None
    assert SamplingSetup.from_config(config) == setup
    old = {"steps": 20, "dtype": "float32", "time_grid": "t_i = i / steps"}  # written before samplers and grids
    assert SamplingSetup.from_config(old) == SamplingSetup(steps=20)
    with pytest.raises(ValueError, match="run/config.json: not a sampling run's configuration"):
        SamplingSetup.from_config({"sampler": "euler"}, "run/config.json")
    with pytest.raises(ValueError, match="do not match its cosine grid"):
        SamplingSetup.from_config({"steps": 3, "sigmas": [1.0, 0.5, 0.2, 0.0]})
