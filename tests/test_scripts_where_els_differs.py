"""scripts/where_els_differs.py: the scale and place of network-vs-ELS differences, on constructed images."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from patchmosaic.runs import save_samples

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("where_els_differs", ROOT / "scripts" / "where_els_differs.py")
wed = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(wed)


def test_blur_of_a_point_is_the_normalised_gaussian():
    img = np.zeros((1, 1, 15, 15))
    img[0, 0, 7, 7] = 1.0
    out = wed.gaussian_blur(img, 1.5)[0, 0]
    r = np.arange(-7, 8)
    g = np.exp(-r**2 / (2 * 1.5**2)) * (np.abs(r) <= math.ceil(4.5))
    g /= g.sum()
    np.testing.assert_allclose(out, np.outer(g, g), atol=1e-12)
    assert out.sum() == pytest.approx(1.0)


def test_border_and_scale_shares_on_constructed_differences():
    rng = np.random.default_rng(0)
    net = rng.normal(size=(3, 1, 16, 16))
    # 1. a difference confined to the outer 2 pixels: all of it in the border band
    ring = wed.border_mask(16, 16, 2)
    a = wed.analyse(net, net + 0.5 * ring, blur=2.0, border=2)
    np.testing.assert_allclose(a["border_share"], 1.0)
    assert a["border_area"] == pytest.approx(ring.mean())
    # 2. a smooth difference (a wide bump) is mostly low-pass; white noise mostly is not
    yy, xx = np.mgrid[:16, :16]
    bump = np.exp(-((yy - 7.5) ** 2 + (xx - 7.5) ** 2) / (2 * 5.0**2))
    smooth = wed.analyse(net, net + bump, blur=1.0, border=2)
    noisy = wed.analyse(net, net + 0.3 * rng.normal(size=net.shape), blur=1.0, border=2)
    assert (smooth["low_share"] > 0.8).all() and (noisy["low_share"] < 0.2).all()
    # a smooth difference leaves the high-pass parts alike, noise leaves the low-pass parts alike
    assert (smooth["r_high"] > 0.99).all() and (noisy["r_high"] < smooth["r_high"]).all()
    # 3. identical images: r = 1 everywhere, no difference to share
    same = wed.analyse(net, net, blur=2.0, border=2)
    np.testing.assert_allclose(same["pearson_r"], 1.0)
    assert np.isnan(same["low_share"]).all() and (same["mean_abs_diff"] == 0).all()


def test_command_line(tmp_path, capsys):
    rng = np.random.default_rng(1)
    seeds = [3, 4]
    net = rng.uniform(-1, 1, size=(2, 1, 8, 8)).astype(np.float32)
    for name, els in (("a", net), ("b", -net)):
        run = tmp_path / name
        run.mkdir()
        save_samples(run / "samples_network.npz", net, seeds, None)
        save_samples(run / "samples_els.npz", els, seeds, None)
    out = tmp_path / "out"
    assert wed.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    data = json.loads((out / "where_els_differs.json").read_text())
    assert data["runs"]["a"]["median"]["pearson_r"] == pytest.approx(1.0)
    assert data["runs"]["b"]["median"]["pearson_r"] == pytest.approx(-1.0)
    assert data["runs"]["b"]["seeds"] == seeds and (out / "where_els_differs.png").is_file()
    assert data["runs"]["a"]["median"]["low_share"] is None  # no difference to share
    # the two runs share the network's samples; their ELS samples are opposite
    assert data["between_runs"] == [{"a": "a", "b": "b", "n_seeds": 2, "network_r": pytest.approx(1.0),
                                     "els_r": pytest.approx(-1.0)}]
    printed = capsys.readouterr().out
    assert "b: median r -1.000" in printed
    assert "a vs b (2 shared seeds): networks' samples median r 1.000, ELS samples -1.000" in printed
    save_samples(tmp_path / "a" / "samples_els.npz", net, [3, 5], None)
    with pytest.raises(SystemExit, match="different seeds"):
        wed.main([str(tmp_path / "a"), "--out", str(out)])


def test_runs_with_the_same_folder_name_pair_on_shared_seeds(tmp_path):
    """Two ablations' evaluate folders share a name: each is named PARENT/FOLDER, and they are compared on the
    seeds both hold, matched by seed whatever their order."""
    rng = np.random.default_rng(2)
    net = rng.uniform(-1, 1, size=(3, 1, 8, 8)).astype(np.float32)
    els = rng.uniform(-1, 1, size=(3, 1, 8, 8)).astype(np.float32)
    a, b = tmp_path / "base" / "evaluate-150-m", tmp_path / "n10k" / "evaluate-150-m"
    for run, idx, seeds in ((a, [0, 1, 2], [7, 8, 9]), (b, [2, 1], [9, 8])):
        run.mkdir(parents=True)
        save_samples(run / "samples_network.npz", net[idx], seeds, None)
        save_samples(run / "samples_els.npz", -els[idx] if run == b else els[idx], seeds, None)
    out = tmp_path / "out"
    assert wed.main([str(a), str(b), "--out", str(out)]) == 0
    data = json.loads((out / "where_els_differs.json").read_text())
    assert sorted(data["runs"]) == ["base/evaluate-150-m", "n10k/evaluate-150-m"]
    assert data["between_runs"] == [{"a": "base/evaluate-150-m", "b": "n10k/evaluate-150-m", "n_seeds": 2,
                                     "network_r": pytest.approx(1.0), "els_r": pytest.approx(-1.0)}]
    with pytest.raises(SystemExit, match="same name"):
        wed.main([str(a), str(a), "--out", str(out)])
