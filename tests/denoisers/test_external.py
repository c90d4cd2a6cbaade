"""diffusers networks as denoisers: the sigma -> timestep map, the three parameterizations, ``--model diffusers:DIR``."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from patchmosaic.denoisers.external import DiffusersDenoiser, timestep_from_sigma
from patchmosaic.runs import load_samples
from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import sigmas_cosine

T = 50
ABAR = torch.cumprod(1.0 - torch.linspace(1e-3, 0.2, T, dtype=torch.float64), 0)  # [T] decreasing


class Oracle(nn.Module):
    """A VP network that knows x0 and abar_k at integer timesteps: its exact eps, x0 or v prediction."""

    def __init__(self, x0: torch.Tensor, prediction: str) -> None:
        super().__init__()
        self.x0, self.prediction = x0, prediction
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t):
        k = t.round().long()
        assert torch.allclose(t, k.to(t.dtype), atol=1e-4), t  # the wrapper must hit integer timesteps
        a = ABAR[k].to(x_t.dtype)[:, None, None, None]  # [B, 1, 1, 1]
        eps = (x_t - a.sqrt() * self.x0) / (1 - a).sqrt()  # [B, C, H, W]
        out = {"epsilon": eps, "sample": self.x0.expand_as(x_t),
               "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * self.x0}[self.prediction]
        return type("Out", (), {"sample": out})()


def test_timestep_is_exact_at_training_sigmas_and_log_linear_between():
    sk = torch.sqrt((1 - ABAR) / ABAR)  # [T]
    np.testing.assert_allclose(timestep_from_sigma(sk, ABAR).numpy(), np.arange(T), atol=1e-9)
    mid = torch.sqrt(sk[10] * sk[11])[None]  # geometric mean: halfway in log sigma
    assert float(timestep_from_sigma(mid, ABAR)) == pytest.approx(10.5, abs=1e-9)
    assert timestep_from_sigma(torch.tensor([1e-9, 1e9], dtype=torch.float64), ABAR).tolist() == [0.0, T - 1.0]


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_parameterizations_recover_x0_at_training_sigmas(prediction):
    torch.manual_seed(0)
    x0 = torch.rand(1, 1, 4, 4, dtype=torch.float64) * 2 - 1  # [1, C, H, W]
    D = DiffusersDenoiser(Oracle(x0, prediction).double(), ABAR, prediction)
    sigma = torch.sqrt((1 - ABAR[[3, 20, 49]]) / ABAR[[3, 20, 49]])  # [3]
    x = x0 + sigma[:, None, None, None] * torch.randn(3, 1, 4, 4, dtype=torch.float64)  # [3, C, H, W]
    np.testing.assert_allclose(D(x, sigma).numpy(), x0.expand(3, -1, -1, -1).numpy(), atol=1e-9)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        DiffusersDenoiser(nn.Linear(1, 1), ABAR, "flow")
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiffusersDenoiser(nn.Linear(1, 1), ABAR.flip(0), "epsilon")


# ------------------------------------------------------------------ a real diffusers UNet on disk


@pytest.fixture
def unet_dir(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="the optional diffusers extra is not installed")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    path = tmp_path / "unet"
    unet.save_pretrained(path, safe_serialization=True)
    diffusers.DDPMScheduler(num_train_timesteps=100).save_pretrained(path)
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8))
    return path, data


def _cli(*args):
    from click.testing import CliRunner

    from patchmosaic.cli import main

    return CliRunner().invoke(main, [*map(str, args)])


def test_sample_and_compare_a_diffusers_unet(unet_dir, tmp_path):
    from patchmosaic.denoisers.external import load_diffusers_unet

    path, data = unet_dir
    out = tmp_path / "s"
    result = _cli("sample", "--model", f"diffusers:{path}", "--steps", 3, "--seeds", "0-2", "--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    denoiser, record = load_diffusers_unet(path)
    assert record["prediction_type"] == "epsilon" and record["num_train_timesteps"] == 100
    expected = sample_seeds(denoiser, [0, 1, 2], (1, 8, 8), sigmas=sigmas_cosine(3))
    np.testing.assert_allclose(load_samples(out)["images"], expected.numpy(), atol=1e-5)
    assert json.loads((out / "config.json").read_text())["model_kind"] == "diffusers"
    # compare needs the machines' training set
    missing = _cli("compare", "--model", f"diffusers:{path}", "--denoisers", "ideal", "--seeds", "0",
                   "--out", tmp_path / "c0")
    assert missing.exit_code == 2 and "--dataset" in missing.output
    cmp = tmp_path / "c"
    result = _cli("compare", "--model", f"diffusers:{path}", "--dataset", data, "--n-train", 5,
                  "--denoisers", "ideal,wiener,nearest", "--seeds", "0-2", "--steps", 2, "--network-steps", 3,
                  "--bootstrap-resamples", 50, "--out", cmp)
    assert result.exit_code == 0, result.output + repr(result.exception)
    board = json.loads((cmp / "leaderboard.json").read_text())
    assert {e["name"] for e in board["leaderboard"]} == {"ideal", "wiener", "nearest"}
    assert board["config"]["training_set"]["n_images"] == 5 and board["config"]["network_steps"] == 3
    np.testing.assert_allclose(load_samples(cmp / "samples_network.npz")["images"], expected.numpy(), atol=1e-5)


def test_evaluate_a_diffusers_unet(unet_dir, tmp_path):
    path, data = unet_dir
    out = tmp_path / "e"
    result = _cli("evaluate", "--model", f"diffusers:{path}", "--dataset", data, "--patch-sizes", "3,5",
                  "--seeds", "0-2", "--network-steps", 3, "--bootstrap-resamples", 50, "--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["network_steps"] == 3 and config["training_set"]["n_images"] == 6
    missing = _cli("evaluate", "--model", f"diffusers:{path}", "--patch-sizes", "3,5", "--out", tmp_path / "e2")
    assert missing.exit_code == 2 and "--dataset" in missing.output
    cal = tmp_path / "cal"
    result = _cli("calibrate", "--model", f"diffusers:{path}", "--dataset", data, "--candidates", "3,5",
                  "--seeds", "0-1", "--steps", 2, "--out", cal)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((cal / "config.json").read_text())["training_set"]["n_train"] is None


def test_diffusers_folder_errors(unet_dir, tmp_path):
    path, _ = unet_dir
    for name, key, value, fragment in (("config.json", "_class_name", "UNet2DConditionModel", "only UNet2DModel"),
                                       ("scheduler_config.json", "_class_name", "EulerDiscreteScheduler",
                                        "expected one of DDPMScheduler, DDIMScheduler"),
                                       ("scheduler_config.json", "prediction_type", "flow", "'flow' is not supported")):
        original = (path / name).read_text()
        (path / name).write_text(json.dumps({**json.loads(original), key: value}))
        result = _cli("sample", "--model", f"diffusers:{path}", "--steps", 2, "--seeds", "0", "--out", tmp_path / "s")
        assert result.exit_code == 1 and fragment in result.output, result.output
        (path / name).write_text(original)
    (path / "diffusion_pytorch_model.safetensors").rename(path / "diffusion_pytorch_model.bin")  # pickled: refused
    result = _cli("sample", "--model", f"diffusers:{path}", "--steps", 2, "--seeds", "0", "--out", tmp_path / "s")
    assert result.exit_code == 1 and "only safetensors" in result.output
    result = _cli("sample", "--model", f"diffusers:{tmp_path / 'nothing'}", "--seeds", "0", "--out", tmp_path / "t")
    assert result.exit_code == 1 and "not found" in result.output
