"""scripts/data_scaling.py end to end on tiny inputs: ELS per n_train against the largest, and against a network."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from patchmosaic.checkpoints import load_denoiser, save_checkpoint
from patchmosaic.data import load_dataset
from patchmosaic.denoisers import ScoreMachine
from patchmosaic.evaluation import pearson_r
from patchmosaic.models import ResNetConfig, build_model
from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import sigmas_cosine
from patchmosaic.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8


def mnist_checkpoint(tmp_path, n_train=20):
    """An untrained tiny ResNet whose train config names the first n_train bundled MNIST digits at 8 px."""
    config = ResNetConfig(in_channels=1, image_size=SIZE, width=4, depth=1, norm_groups=0)
    torch.manual_seed(0)
    train = TrainConfig(dataset="mnist", n_train=n_train, image_size=SIZE, model=config, steps=1)
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model(config), config, step=1, train_config=train.to_dict())
    return path


def run(*args):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "data_scaling.py"), *map(str, args)],
                          capture_output=True, text=True, check=False, timeout=600)
    return done


def test_els_against_the_largest_n_train_and_the_network(tmp_path):
    ckpt = mnist_checkpoint(tmp_path)
    out = tmp_path / "out"
    common = ("--n-train", "10,20", "--seeds", "0-2", "--size", SIZE, "--schedule", "3,3", "--threads", 1,
              "--out", out)
    done = run(*common, "--model", ckpt, "--network-steps", 4)
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "data_scaling.json").read_text())
    assert result["network"] == {"model": str(ckpt), "n_train": 20, "network_steps": 4}
    rows = {row["n_train"]: row for row in result["rows"]}
    # the numbers are those of the library run by hand: ELS on the first n digits, the network on 4 steps
    network = sample_seeds(load_denoiser(ckpt), [0, 1, 2], (1, SIZE, SIZE), sigmas=sigmas_cosine(4)).numpy()
    els = {}
    for n in (10, 20):
        images = load_dataset("mnist", n_train=n, size=SIZE).images
        machine = ScoreMachine(images, kind="els", padding="zeros").bind(patch_sizes=[3, 3])
        els[n] = sample_seeds(machine, [0, 1, 2], (1, SIZE, SIZE), sigmas=sigmas_cosine(2)).numpy()
    for n in (10, 20):
        np.testing.assert_allclose(rows[n]["pearson_r_per_seed"], pearson_r(els[20], els[n]), atol=1e-5)
        np.testing.assert_allclose(rows[n]["network_r_per_seed"], pearson_r(network, els[n]), atol=1e-5)
    assert rows[20]["median_r"] == 1.0
    assert (out / "data_scaling.png").is_file() and (out / "samples_network.npz").is_file()
    assert "with the network: median r" in done.stdout
    # a rerun with other network steps refuses the saved network samples instead of mixing them
    again = run(*common, "--model", ckpt, "--network-steps", 5)
    assert again.returncode != 0 and "samples_network.npz holds other seeds or step counts" in again.stderr


def test_model_must_be_an_unconditional_mnist_network(tmp_path):
    config = ResNetConfig(in_channels=1, image_size=SIZE, width=4, depth=1, norm_groups=0)
    train = TrainConfig(dataset="fashion-mnist", n_train=20, image_size=SIZE, model=config, steps=1)
    save_checkpoint(tmp_path / "model.pt", build_model(config), config, step=1, train_config=train.to_dict())
    done = run("--n-train", "10", "--seeds", "0", "--size", SIZE, "--schedule", "3,3", "--model",
               tmp_path / "model.pt", "--out", tmp_path / "out")
    assert done.returncode != 0 and "dataset 'fashion-mnist'" in done.stderr
