"""Provenance of PatchComposite and DataLocality against the float64 weights written from their formulas."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from patchmosaic.cli import main
from patchmosaic.denoisers import DataLocality, PatchComposite, Wiener
from patchmosaic.denoisers.data_locality import locality_mask
from patchmosaic.denoisers.wiener import GaussianMoments


def _softmax(logits):  # over the last axis
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def pspc_weights(x, train, sigma, P, flips):
    """omega[k, y, x] = mean over windows w containing (y, x) of softmax_k(-|x_w - X_k,w|^2 / 2 sigma^2)."""
    cands = np.concatenate([train, train[..., ::-1]]) if flips else train  # [K, C, H, W]
    _, H, W = x.shape
    total = np.zeros((len(cands), H, W))
    count = np.zeros((H, W))
    for y0 in range(H - P + 1):
        for x0 in range(W - P + 1):
            d = ((x[None, :, y0 : y0 + P, x0 : x0 + P] - cands[:, :, y0 : y0 + P, x0 : x0 + P]) ** 2).sum((1, 2, 3))
            total[:, y0 : y0 + P, x0 : x0 + P] += _softmax(-d / (2 * sigma**2))[:, None, None]
            count[y0 : y0 + P, x0 : x0 + P] += 1
    return total / count  # [K, H, W]


def locality_weights(x, train, sigma, M):
    """omega[k, y, x] = mean over channels of softmax_k(-sum_i M[i, j] (x_i - X_k,i)^2 / 2 sigma^2), j = (c, y, x)."""
    N, C, H, W = train.shape
    n = C * H * W
    d = ((x.reshape(1, n, 1) - train.reshape(N, n, 1)) ** 2 * M.reshape(1, n, n)).sum(1)  # [N, n]
    w = _softmax((-d / (2 * sigma**2)).T).T  # [N, n]
    return w.reshape(N, C, H, W).mean(1)


def check(prov, b, omega, ids, flipped, top):
    """The tally's top entries, N_eff and entropy equal the brute-force weights of sample b."""
    K, H, W = omega.shape
    np.testing.assert_allclose(prov.n_eff[b].numpy(), 1 / (omega**2).sum(0), rtol=1e-9)
    ent = -(np.where(omega > 0, omega * np.log(np.where(omega > 0, omega, 1)), 0)).sum(0)
    np.testing.assert_allclose(prov.entropy[b].numpy(), ent, atol=1e-9)
    order = np.sort(omega, axis=0)[::-1][:top]  # [min(top, K), H, W]
    got = prov.weight[b].permute(2, 0, 1).numpy()  # [top, H, W]
    np.testing.assert_allclose(got[: len(order)], order, atol=1e-12)
    assert (got[len(order) :] == 0).all() and (prov.index[b, :, :, len(order) :] == -1).all()  # empty slots
    for y in range(H):
        for x in range(W):
            for m in range(len(order)):
                k_ids = np.flatnonzero(np.isclose(omega[:, y, x], float(prov.weight[b, y, x, m]), rtol=0, atol=1e-12))
                assert any(ids[k] == int(prov.index[b, y, x, m]) for k in k_ids)
                k = k_ids[0]
                want_x = W - 1 - x if flipped[k] else x
                if len(k_ids) == 1:
                    assert prov.source[b, y, x, m].tolist() == [y, want_x]


@pytest.mark.parametrize("flips", [False, True])
def test_patch_composite_provenance(flips):
    g = torch.Generator().manual_seed(1)
    train = torch.rand(5, 2, 5, 6, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 1, 0, 1, 0])
    x = torch.randn(3, 2, 5, 6, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.4, 3.0, 0.4], dtype=torch.float64)
    D = PatchComposite(train, patch_size=3, flips=flips, labels=labels)
    for label in (None, torch.tensor([1, 0, 0])):
        x0, prov = D.with_provenance(x, sigma, top=3, label=label)
        torch.testing.assert_close(x0, D(x, sigma, label=label))
        for b in range(3):
            keep = np.arange(5) if label is None else np.flatnonzero(labels.numpy() == int(label[b]))
            ids = np.concatenate([keep, keep]) if flips else keep
            flipped = np.r_[np.zeros(len(keep), bool), np.ones(len(keep), bool)] if flips else np.zeros(len(keep), bool)
            omega = pspc_weights(x[b].numpy(), train.numpy()[keep], float(sigma[b]), 3, flips)
            check(prov, b, omega, ids, flipped, 3)
    # with every candidate kept, the mixture reproduces the output in every channel
    _, whole = D.with_provenance(x, sigma, top=10)
    vals = train[whole.index.clamp_min(0), :, whole.source[..., 0], whole.source[..., 1]]  # [B, H, W, m, C]
    rec = (whole.weight[..., None] * vals).sum(3).permute(0, 3, 1, 2)  # [B, C, H, W]
    torch.testing.assert_close(rec, D(x, sigma), atol=1e-12, rtol=0)


def test_data_locality_provenance_one_and_two_channels():
    g = torch.Generator().manual_seed(2)
    for C in (1, 2):
        train = torch.rand(6, C, 4, 3, generator=g, dtype=torch.float64) * 2 - 1
        x = torch.randn(2, C, 4, 3, generator=g, dtype=torch.float64)
        D = DataLocality(train, threshold=0.1)
        sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
        x0, prov = D.with_provenance(x, sigma, top=4)
        torch.testing.assert_close(x0, D(x, sigma))
        moments = GaussianMoments.fit(train)
        for b in range(2):
            M = locality_mask(moments, float(sigma[b]), 0.1).numpy().astype(float)
            omega = locality_weights(x[b].numpy(), train.numpy(), float(sigma[b]), M)
            check(prov, b, omega, np.arange(6), np.zeros(6, bool), 4)


def test_denoisers_without_a_mixture_refuse_provenance():
    train = torch.rand(4, 1, 3, 3, dtype=torch.float64) * 2 - 1
    with pytest.raises(ValueError, match="reports no provenance"):
        Wiener(train).with_provenance(torch.zeros(1, 1, 3, 3, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="top must be a non-negative integer"):
        PatchComposite(train, patch_size=2).with_provenance(torch.zeros(1, 1, 3, 3, dtype=torch.float64), 1.0, top=-1)


@pytest.mark.parametrize("name,params", [("pspc", ["--patch-size", "3"]), ("data-locality", ["--threshold", "0.5"])])
def test_sample_provenance_explain_and_report_for_the_family(tmp_path, name, params):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    out = tmp_path / "run"
    args = ["sample", "--dataset", str(data), "--size", "native", "--denoiser", name, *params, "--steps", "3",
            "--seeds", "0-1", "--provenance", "--provenance-top", "3", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with np.load(out / "provenance.npz") as z:
        assert z["index"].shape == (2, 8, 8, 3) and z["n_eff"].shape == (3, 2, 8, 8)
        assert (z["index"] >= 0).all() and (z["index"] < 6).all() and (z["count"] == 1).all()
    result = CliRunner().invoke(main, ["explain", str(out), "--no-compare-ideal"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "explain.json").read_text())["machine"] == name
    result = CliRunner().invoke(main, ["report", str(out), "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "explorer" in (tmp_path / "report" / "index.html").read_text(encoding="utf-8")
