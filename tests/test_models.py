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
    SelfAttention,
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


# ------------------------------------------------------------------ UNet with self-attention


def attention_unet(size=16, padding="zeros", **kw):
    """A tiny UNet with attention whose zero-initialised output projection is made non-zero."""
    cfg = UNetConfig(image_size=size, base_width=8, channel_mults=(1, 2), blocks_per_level=1, padding_mode=padding,
                     attention=True, attention_heads=2, **kw)
    model = build_model(cfg).double()
    with torch.no_grad():
        model.mid_attention.proj.weight.normal_(0.0, 0.5)  # [16, 16, 1, 1]
    return model


def test_attention_block_starts_as_identity_and_has_heads():
    block = SelfAttention(16, heads=4, groups=8)
    x = torch.randn(2, 16, 4, 4)  # [B, C, H, W]
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="heads=3 must divide channels=16"):
        SelfAttention(16, heads=3, groups=8)


def test_attention_block_matches_multihead_attention_written_out():
    """Brute force: softmax(q k^T / sqrt(d)) v per head, from the block's own 1x1 weights."""
    torch.manual_seed(0)
    block = SelfAttention(6, heads=2, groups=0).double()
    with torch.no_grad():
        block.proj.weight.normal_()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)  # [B, C, H, W]
    tokens = x.flatten(2).transpose(1, 2)  # [B, N, C]
    w_qkv, b_qkv = block.qkv.weight[:, :, 0, 0], block.qkv.bias  # [3C, C], [3C]
    q, k, v = (tokens @ w_qkv.T + b_qkv).split(6, dim=-1)  # each [B, N, C]
    heads = []
    for h in range(2):
        sl = slice(3 * h, 3 * h + 3)
        a = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(3), dim=-1)  # [B, N, N]
        heads.append(a @ v[..., sl])  # [B, N, 3]
    out = torch.cat(heads, dim=-1) @ block.proj.weight[:, :, 0, 0].T + block.proj.bias  # [B, N, C]
    expected = x + out.transpose(1, 2).reshape(2, 6, 3, 4)
    torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_attention_unet_output_shape(num_classes):
    cfg = tiny_config("unet", num_classes=num_classes, in_channels=3, attention=True, attention_heads=4)
    model = build_model(cfg)
    assert isinstance(model.mid_attention, SelfAttention) and model.mid_attention.heads == 4
    x = torch.randn(2, 3, 8, 8)  # [B, C, H, W]
    eps = model(x, torch.rand(2), torch.tensor([0, 2]) if num_classes else None)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    plain = build_model(tiny_config("unet", num_classes=num_classes, in_channels=3))
    assert plain.mid_attention is None
    assert set(model.state_dict()) - set(plain.state_dict()) == {
        f"mid_attention.{name}" for name in ("norm.weight", "norm.bias", "qkv.weight", "qkv.bias",
                                             "proj.weight", "proj.bias")
    }


def test_attention_unet_sees_the_far_corner():
    """Without GroupNorm, the corner output of the plain UNet ignores the opposite corner; with attention not."""
    t = torch.full((1,), 0.5, dtype=torch.float64)
    for attention in (False, True):
        torch.manual_seed(0)
        model = attention_unet(norm_groups=0) if attention else build_model(
            UNetConfig(image_size=16, base_width=8, channel_mults=(1, 2), blocks_per_level=1, norm_groups=0)
        ).double()
        x = torch.randn(1, 1, 16, 16, dtype=torch.float64, requires_grad=True)
        model(x, t)[0, 0, 0, 0].backward()
        far = x.grad[0, 0, 15, 15].item()
        assert (far != 0) == attention, (attention, far)


def test_circular_attention_unet_is_still_equivariant_to_shifts_of_the_pooling_grid():
    """Attention has no positional encoding: it permutes with the positions."""
    torch.manual_seed(0)
    model = attention_unet(size=8, padding="circular")
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    rolled = model(torch.roll(x, (2, 4), dims=(2, 3)), t)
    torch.testing.assert_close(rolled, torch.roll(model(x, t), (2, 4), dims=(2, 3)), rtol=0, atol=1e-12)


def test_attention_config_round_trip_defaults_and_errors():
    cfg = tiny_config("unet", attention=True, attention_heads=2)
    d = config_to_dict(cfg)
    assert d["attention"] is True and d["attention_heads"] == 2
    assert config_from_dict(d) == cfg
    old = {k: v for k, v in config_to_dict(tiny_config("unet")).items() if not k.startswith("attention")}
    assert config_from_dict(old).attention is False  # configs written before the option
    with pytest.raises(ValueError, match="attention_heads=3 must divide the 16 channels of the lowest level"):
        tiny_config("unet", attention=True, attention_heads=3)
    with pytest.raises(ValueError, match="attention must be true or false"):
        tiny_config("unet", attention=1)
    with pytest.raises(ValueError, match=r"unknown resnet config field\(s\) \['attention'\]"):
        config_from_dict({"arch": "resnet", "attention": True})
