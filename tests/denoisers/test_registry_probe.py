import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import reference_family as ref
from patchmosaic.cli import main
from patchmosaic.denoisers.data_locality import DataLocality
from patchmosaic.denoisers.score_machines import IdealScoreMachine as Ideal
from patchmosaic.denoisers.neighbours import KNNImportance, Nearest, TopK
from patchmosaic.denoisers.patch_composite import PatchComposite
from patchmosaic.denoisers.registry import DENOISERS, build_denoiser, denoiser_table
from patchmosaic.denoisers.smoothed import Smoothed
from patchmosaic.denoisers.wiener import Wiener
from patchmosaic.probe import probe


def _train(N=8, shape=(1, 5, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((N, *shape), generator=g, dtype=torch.float64) * 2 - 1


@pytest.mark.parametrize(
    "name,params,cls",
    [
        ("ideal", {}, Ideal),
        ("wiener", {"rank": 3}, Wiener),
        ("data-locality", {"threshold": 0.05}, DataLocality),
        ("pspc", {"patch_size": 3, "flips": True}, PatchComposite),
        ("smoothed", {"std": 0.1, "draws": 2}, Smoothed),
        ("topk", {"k": 3}, TopK),
        ("knn", {"k": 3, "samples": 4}, KNNImportance),
        ("nearest", {}, Nearest),
    ],
)
def test_build_every_denoiser_with_labels(name, params, cls):
    train = _train()
    labels = torch.tensor([0, 1] * 4)
    D = build_denoiser(name, train, labels=labels, **params)
    assert isinstance(D, cls)
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    out = D(x, 0.5, label=torch.tensor([1, 0]))
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()


def test_smoothed_base_receives_its_parameters():
    train = _train()
    D = build_denoiser("smoothed", train, base="topk", k=2, std=0.0, draws=1)
    assert isinstance(D.base, TopK) and D.base.k == 2
    x = torch.randn(2, 1, 5, 6, dtype=torch.float64)
    for b in range(2):
        np.testing.assert_allclose(D(x, 0.3)[b].numpy(), ref.topk(x[b].numpy(), train.numpy(), 0.3, 2), atol=1e-10)


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("data-locality", {"threshold": 0.0}, r"threshold must be in \(0, 1\]"),
        ("data-locality", {"threshold": 1.5}, r"threshold must be in \(0, 1\]"),
        ("data-locality", {}, r"needs the parameter threshold="),
        ("wiener", {"rank": 0}, r"rank must be in 1\.\.30"),
        ("wiener", {"rank": 31}, r"rank must be in 1\.\.30"),
        ("topk", {"k": 9}, r"k must be in 1\.\.8"),
        ("knn", {"k": 0, "samples": 2}, r"k must be in 1\.\.8"),
        ("smoothed", {"std": 0.1, "draws": 0}, r"draws must be in 1"),
        ("smoothed", {"std": -1.0}, r"std must be finite and >= 0"),
        ("smoothed", {"std": 0.1, "base": "smoothed"}, r"base must be one of"),
        ("pspc", {"patch_size": 6}, r"patch_size must be in 1\.\.5 \(the image is 5x6\)"),
        ("topk", {"k": 2, "kk": 3}, r"unknown parameter\(s\) \['kk'\] for denoiser 'topk'"),
        ("smoothed", {"std": 0.1, "k": 2}, r"unknown parameter\(s\) \['k'\] for denoiser 'ideal'"),
        ("diffusion", {}, r"unknown denoiser 'diffusion'"),
    ],
)
def test_bad_parameters_have_one_clear_error(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_denoiser(name, _train(), **params)


def test_table_lists_every_method():
    table = denoiser_table()
    assert set(DENOISERS) == {"ideal", "wiener", "data-locality", "pspc", "smoothed", "topk", "knn", "nearest"}
    for name in DENOISERS:
        assert f"`{name}`" in table
    assert "2509.09672" in table and "0.005" in table


def test_probe_zero_for_the_ideal_and_positive_for_nearest():
    train = _train(10)
    ideal = Ideal(train)
    heldout = _train(3, seed=1)
    exact = probe(Ideal(train), ideal, train[:3], heldout, [0.1, 1.0, 10.0])
    assert max(exact.train_error + exact.heldout_error) < 1e-12
    near = probe(Nearest(train), ideal, train[:3], heldout, [0.1, 10.0], batch_size=2)
    assert near.heldout_error[1] > 0.1  # at sigma = 10 the posterior is spread, the nearest image is not
    # by hand for the first held-out image at sigma = 10
    from patchmosaic.denoisers.base import call_generator

    g = call_generator(0, 1)
    torch.randn(train[:3].shape, generator=g)  # the training set's draw comes first
    eps = torch.randn(heldout.shape, generator=g).double()
    x = heldout + 10.0 * eps
    d_ideal, d_near = ideal(x, 10.0), Nearest(train)(x, 10.0)
    errs = (d_near - d_ideal).flatten(1).norm(dim=1) / d_ideal.flatten(1).norm(dim=1)
    assert near.heldout_error[1] == pytest.approx(float(errs.mean()), rel=1e-12)
    assert "held-out" in near.table()


def test_probe_cli_prints_and_writes_json(tmp_path):
    runner = CliRunner()
    args = ["probe", "--dataset", "mnist", "--n-train", "50", "--denoiser", "topk", "--k", "50",
            "--sigmas", "0.1,10", "--queries", "2"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "held-out rel. L2" in result.output and not list(tmp_path.iterdir())
    out = tmp_path / "probe.json"
    result = runner.invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["denoiser"] == "topk" and data["params"] == {"k": 50} and data["sigmas"] == [0.1, 10.0]
    assert max(data["train_rel_l2"] + data["heldout_rel_l2"]) < 1e-5  # k = N is the ideal denoiser (float32)
    bad = runner.invoke(main, ["probe", "--n-train", "50", "--denoiser", "topk", "--k", "51", "--queries", "2"])
    assert bad.exit_code != 0 and "k must be in 1..50" in bad.output
    bad = runner.invoke(main, ["probe", "--n-train", "50", "--denoiser", "topk", "--k", "3", "--sigmas", "0,1"])
    assert bad.exit_code != 0 and "every sigma must be finite and > 0" in bad.output
