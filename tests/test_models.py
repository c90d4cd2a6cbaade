"""Networks and the eps -> x0 denoiser wrapper (patchmosaic.models)."""

import math

import pytest
import torch
from torch import nn

import patchmosaic
from patchmosaic.denoisers import EpsDenoiser
from patchmosaic.models import (
    MinimalResNet,
    MinimalUNet,
    ResNetConfig,
    UNetConfig,
    build_model,
    config_from_dict,
    config_to_dict,
)
from patchmosaic.schedules import CosineSchedule




def tiny_config(arch, *, padding="zeros", num_classes=0, size=8, **kw):
    if arch == "resnet":
        return ResNetConfig(image_size=size, width=8, depth=2, padding_mode=padding, num_classes=num_classes, **kw)
    return UNetConfig(
        image_size=size, base_width=8, channel_mults=(1, 2), blocks_per_level=1, padding_mode=padding,
        num_classes=num_classes, **kw,
    )


@pytest.mark.parametrize("arch", ["resnet", "unet"])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_output_shape(arch, padding, num_classes):
    model = build_model(tiny_config(arch, padding=padding, num_classes=num_classes, in_channels=3))
    assert isinstance(model, MinimalResNet if arch == "resnet" else MinimalUNet)
    x = torch.randn(2, 3, 8, 8)  # [B, C, H, W]
    label = torch.tensor([0, 2]) if num_classes else None
    eps = model(x, torch.rand(2), label)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert {m.kernel_size for m in convs} <= {(3, 3), (1, 1)}
    assert all(m.padding_mode == padding for m in convs if m.kernel_size == (3, 3))


@pytest.mark.parametrize("arch", ["resnet", "unet"])
def test_conditioning_changes_output(arch):
    model = build_model(tiny_config(arch, num_classes=3))
    x, t = torch.randn(1, 1, 8, 8), torch.rand(1)
    assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t, torch.tensor([1])))
    assert not torch.allclose(model(x, t, torch.tensor([0])), model(x, t + 0.3, torch.tensor([0])))


def test_input_errors():
    model = build_model(tiny_config("resnet"))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        model(torch.randn(2, 1, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="t must have shape"):
        model(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pass a label"):
        build_model(tiny_config("resnet", num_classes=2))(torch.randn(2, 1, 8, 8), torch.rand(2))


@pytest.mark.parametrize("norm_groups", [8, 0])
def test_circular_resnet_is_translation_equivariant(norm_groups):
    model = build_model(tiny_config("resnet", padding="circular", norm_groups=norm_groups)).double()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    for shift in [(1, 0), (3, 5), (-2, 7)]:
        rolled = model(torch.roll(x, shift, dims=(2, 3)), t)
        torch.testing.assert_close(rolled, torch.roll(model(x, t), shift, dims=(2, 3)), rtol=0, atol=1e-12)


def test_zeros_resnet_is_not_translation_equivariant():
    model = build_model(tiny_config("resnet", padding="zeros")).double()
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    diff = model(torch.roll(x, (1, 2), dims=(2, 3)), t) - torch.roll(model(x, t), (1, 2), dims=(2, 3))
    assert diff.abs().max() > 1e-3


def test_circular_unet_is_equivariant_to_shifts_of_the_pooling_grid():
    model = build_model(tiny_config("unet", padding="circular")).double()  # two levels: shifts by 2
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    rolled = model(torch.roll(x, (2, 4), dims=(2, 3)), t)
    torch.testing.assert_close(rolled, torch.roll(model(x, t), (2, 4), dims=(2, 3)), rtol=0, atol=1e-12)


def test_resnet_receptive_field_without_norm():
    """Without GroupNorm an output pixel depends on exactly the 4 * depth + 5 window around it."""
    cfg = ResNetConfig(image_size=16, width=8, depth=2, norm_groups=0)
    assert cfg.receptive_field == 13
    model = build_model(cfg).double()
    x = torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
    model(x, torch.full((1,), 0.5, dtype=torch.float64))[0, 0, 8, 8].backward()
    support = (x.grad[0, 0] != 0).nonzero()  # [n, 2]
    r = cfg.receptive_field // 2
    assert support.min(0).values.tolist() == [8 - r, 8 - r]
    assert support.max(0).values.tolist() == [8 + r, 8 + r]


def test_config_dict_round_trip_and_errors():
    for cfg in [tiny_config("resnet", num_classes=3), tiny_config("unet", padding="circular")]:
        d = config_to_dict(cfg)
        assert isinstance(d["arch"], str) and all(not isinstance(v, tuple) for v in d.values())
        assert config_from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown model arch"):
        config_from_dict({"arch": "vit"})
    with pytest.raises(ValueError, match=r"unknown resnet config field\(s\) \['widht'\]"):
        config_from_dict({"arch": "resnet", "widht": 3})
    with pytest.raises(ValueError, match="norm_groups=8 must divide"):
        ResNetConfig(width=12)
    with pytest.raises(ValueError, match="not divisible"):
        UNetConfig(image_size=28, channel_mults=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="padding_mode"):
        ResNetConfig(padding_mode="reflect")


# ------------------------------------------------------------------ EpsDenoiser


class FakeEps(nn.Module):
    """eps_hat = 0.5 x_t + t (+ label): a known noise prediction."""

    def __init__(self, num_classes=0):
        super().__init__()
        self.config = ResNetConfig(image_size=4, width=8, depth=1, num_classes=num_classes)
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.seen_training = None

    def forward(self, x_t, t, label=None):
        self.seen_training = self.training
        assert torch.is_grad_enabled() is False
        out = 0.5 * x_t + t[:, None, None, None] + self.dummy
        if label is not None:
            out = out + label[:, None, None, None].to(out.dtype)
        return out


def test_eps_denoiser_inverts_the_forward_process():
    """D(x, sigma) at x = x_t / sqrt(abar) equals the VP inversion (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    model = FakeEps()
    x_t = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = 0.3
    sched = CosineSchedule()
    ab, sigma = float(sched.alpha_bar(t)), float(sched.sigma(t))
    x0 = EpsDenoiser(model)(x_t / math.sqrt(ab), sigma)
    expected = (x_t - math.sqrt(1 - ab) * (0.5 * x_t + t)) / math.sqrt(ab)
    torch.testing.assert_close(x0, expected, rtol=0, atol=1e-12)
    assert x0.dtype == torch.float64
    assert model.seen_training is False and model.training  # eval during the call, restored after


def test_eps_denoiser_clip_and_labels():
    model = FakeEps(num_classes=3)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    sched = CosineSchedule()
    ab, sigma = float(sched.alpha_bar(1.0)), float(sched.sigma(1.0))
    x0 = EpsDenoiser(model, label=torch.tensor([0, 2]))(x / math.sqrt(ab), sigma)
    eps = 0.5 * x + 1.0 + torch.tensor([0.0, 2.0], dtype=torch.float64)[:, None, None, None]
    torch.testing.assert_close(x0, (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab), rtol=0, atol=1e-9)
    assert x0.abs().max() > 1
    clipped = EpsDenoiser(model, label=1, clip=True)(x / math.sqrt(ab), sigma)
    assert clipped.abs().max() <= 1


def test_bind_errors():
    uncond, cond = EpsDenoiser(FakeEps()), EpsDenoiser(FakeEps(num_classes=3))
    with pytest.raises(ValueError, match="no locality schedule"):
        uncond.bind(patch_sizes=[3, 3])
    with pytest.raises(ValueError, match="unconditional"):
        uncond.bind(label=1)
    with pytest.raises(ValueError, match="pass a label"):
        cond.bind()
    with pytest.raises(ValueError, match="out of range"):
        cond.bind(label=3)
    with pytest.raises(ValueError, match="out of range"):
        cond.bind(label=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="integer"):
        cond.bind(label=1.5)
    with pytest.raises(ValueError, match="bind a label"):
        cond(torch.zeros(1, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"\[B\] = \[3\]"):
        cond.bind(label=torch.tensor([0, 1]))(torch.zeros(3, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"sigma must be finite and > 0"):
        uncond(torch.zeros(1, 1, 4, 4), 0.0)
    bound = cond.bind(label=2)
    assert bound.label == 2 and cond.label is None


def test_sample_drives_a_network():
    model = build_model(tiny_config("resnet"))
    noise = patchmosaic.noise_for_seeds([0, 1], (1, 8, 8))  # [2, 1, 8, 8]
    out = patchmosaic.sample(EpsDenoiser(model), noise, steps=3)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    cond = build_model(tiny_config("unet", num_classes=3))
    out = patchmosaic.sample(EpsDenoiser(cond), noise, steps=3, label=torch.tensor([0, 2]))
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="no locality schedule"):
        patchmosaic.sample(EpsDenoiser(model), noise, steps=3, patch_sizes=[3, 3, 3])
