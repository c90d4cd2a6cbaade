"""Minimal convolutional diffusion networks.

The networks follow Kamb & Ganguli (2412.20292, App. B): only 3x3
convolutions (1x1 where a skip connection changes the channel count), no
self-attention unless asked for, GroupNorm + SiLU residual blocks and a
sinusoidal time embedding that each block adds to its features. Both predict the noise
``eps_hat = net(x_t, t, label)`` of the forward process
``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``.

* :class:`MinimalResNet`: a stack of residual blocks at full resolution. Its
  receptive field (``4 * depth + 5`` pixels wide) is what makes it local.
* :class:`MinimalUNet`: residual blocks on an average-pool / nearest-upsample
  pyramid with skip connections; ``attention=True`` adds one multi-head
  self-attention block (:class:`SelfAttention`) at the lowest resolution, the
  paper's ``mnist-unet-attention`` (Table 1), whose outputs depend on every
  input pixel.

:class:`patchmosaic.denoisers.EpsDenoiser` adapts either one to the denoiser
protocol ``D(x, sigma) -> x0_hat``.

GroupNorm normalises over the whole image, so with ``norm_groups > 0`` every
output pixel depends (weakly, through the statistics) on every input pixel;
``norm_groups = 0`` drops normalisation and makes the receptive field exact.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ARCHS",
    "PADDING_MODES",
    "MinimalResNet",
    "MinimalUNet",
    "ModelConfig",
    "ResNetConfig",
    "SelfAttention",
    "UNetConfig",
    "build_model",
    "config_from_dict",
    "config_to_dict",
]

PADDING_MODES = ("zeros", "circular")


def _check_positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _check_common(cfg: "ResNetConfig | UNetConfig", widths: tuple[int, ...]) -> None:
    """Validation shared by both configs: data shape, padding, classes, GroupNorm."""
    _check_positive_int(cfg.in_channels, "in_channels")
    _check_positive_int(cfg.image_size, "image_size")
    if cfg.padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {cfg.padding_mode!r}")
    if isinstance(cfg.num_classes, bool) or not isinstance(cfg.num_classes, int) or cfg.num_classes < 0:
        raise ValueError(f"num_classes must be 0 (unconditional) or a positive integer, got {cfg.num_classes!r}")
    if isinstance(cfg.norm_groups, bool) or not isinstance(cfg.norm_groups, int) or cfg.norm_groups < 0:
        raise ValueError(f"norm_groups must be 0 (no normalisation) or a positive integer, got {cfg.norm_groups!r}")
    bad = sorted({w for w in widths if cfg.norm_groups and w % cfg.norm_groups})
    if bad:
        raise ValueError(f"norm_groups={cfg.norm_groups} must divide every channel count; it does not divide {bad}")
    if not cfg.time_scale > 0:
        raise ValueError(f"time_scale must be positive, got {cfg.time_scale!r}")


@dataclass(frozen=True)
class ResNetConfig:
    """A :class:`MinimalResNet`: ``depth`` residual blocks at full resolution."""

    in_channels: int = 1  # image channels C (1 for MNIST, 3 for CIFAR-10)
    image_size: int = 32  # side H = W of the images the network is trained on
    width: int = 64  # channels of every residual block
    depth: int = 6  # residual blocks (two 3x3 convs each): receptive field 4 * depth + 5
    padding_mode: str = "zeros"  # "zeros" or "circular", for every convolution
    num_classes: int = 0  # > 0: class-conditional with this many classes (embedding added to time's)
    norm_groups: int = 8  # GroupNorm groups; 0 drops normalisation (strictly local receptive field)
    time_scale: float = 1000.0  # t in [0, 1] is embedded as sinusoids of time_scale * t

    def __post_init__(self) -> None:
        _check_positive_int(self.width, "width")
        _check_positive_int(self.depth, "depth")
        _check_common(self, (self.width,))

    @property
    def receptive_field(self) -> int:
        """Side of the square input window one output pixel sees (without GroupNorm)."""
        return 2 * (2 * self.depth + 2) + 1  # input conv + 2 convs per block + output conv, radius 1 each


@dataclass(frozen=True)
class UNetConfig:
    """A :class:`MinimalUNet`: residual blocks on a 2x average-pool pyramid."""

    in_channels: int = 1  # image channels C
    image_size: int = 32  # side H = W; must be divisible by 2 ** (len(channel_mults) - 1)
    base_width: int = 32  # channels at full resolution
    channel_mults: tuple[int, ...] = (1, 2, 2)  # level l has base_width * channel_mults[l] channels
    blocks_per_level: int = 2  # residual blocks per level, on the way down and again on the way up
    padding_mode: str = "zeros"  # "zeros" or "circular", for every convolution
    num_classes: int = 0  # > 0: class-conditional with this many classes
    norm_groups: int = 8  # GroupNorm groups; 0 drops normalisation
    time_scale: float = 1000.0  # t in [0, 1] is embedded as sinusoids of time_scale * t
    attention: bool = False  # one self-attention block at the lowest resolution (mnist-unet-attention)
    attention_heads: int = 1  # heads of that block; must divide base_width * channel_mults[-1]

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        if not isinstance(self.attention, bool):
            raise ValueError(f"attention must be true or false, got {self.attention!r}")
        _check_positive_int(self.attention_heads, "attention_heads")
        _check_positive_int(self.base_width, "base_width")
        _check_positive_int(self.blocks_per_level, "blocks_per_level")
        if not self.channel_mults:
            raise ValueError("channel_mults needs at least one level")
        for m in self.channel_mults:
            _check_positive_int(m, "every channel multiplier")
        _check_common(self, tuple(self.base_width * m for m in self.channel_mults))
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by 2 ** (levels - 1) = {factor} "
                f"for channel_mults={self.channel_mults}"
            )
        lowest = self.base_width * self.channel_mults[-1]
        if self.attention and lowest % self.attention_heads:
            raise ValueError(
                f"attention_heads={self.attention_heads} must divide the {lowest} channels of the lowest level"
            )


ModelConfig = ResNetConfig | UNetConfig
ARCHS: dict[str, type] = {"resnet": ResNetConfig, "unet": UNetConfig}


def config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """JSON-able dict of a model config, with its ``arch`` (``"resnet"``/``"unet"``)."""
    arch = next((name for name, cls in ARCHS.items() if type(config) is cls), None)
    if arch is None:
        raise ValueError(f"not a model config: {type(config).__name__}")
    out: dict[str, Any] = {"arch": arch}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of :func:`config_to_dict`.

    Raises:
        ValueError: On a missing or unknown ``arch``, unknown fields or invalid values.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a model config must be a dict, got {type(data).__name__}")
    fields = dict(data)
    arch = fields.pop("arch", None)
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {tuple(ARCHS)}")
    cls = ARCHS[arch]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown {arch} config field(s) {unknown}; known: {sorted(known)}")
    if "channel_mults" in fields and isinstance(fields["channel_mults"], list):
        fields["channel_mults"] = tuple(fields["channel_mults"])
    return cls(**fields)


# ----------------------------------------------------------------- building blocks


def _conv3x3(c_in: int, c_out: int, padding_mode: str) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, padding_mode=padding_mode)


def _norm(groups: int, channels: int) -> nn.Module:
    return nn.GroupNorm(groups, channels) if groups else nn.Identity()


def timestep_embedding(t: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    """Sinusoidal embedding ``[cos(s t w_j), sin(s t w_j)]``, ``w_j = 10000^(-j / (dim/2))``.

    Args:
        t: ``[B]`` float times in [0, 1].
        dim: Even embedding size.
        scale: ``s``, so that ``s t`` spans the integer-step range (1000) of DDPM.

    Returns:
        ``[B, dim]`` embedding in the dtype of ``t``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)  # [half]
    args = scale * t[:, None] * freqs[None, :]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # [B, dim]


class TimeEmbedding(nn.Module):
    """t -> sinusoids -> MLP, plus an optional class embedding (added)."""

    def __init__(self, width: int, emb_dim: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.width, self.scale = width, scale
        self.mlp = nn.Sequential(nn.Linear(width, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes else None

    def forward(self, t: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        emb = self.mlp(timestep_embedding(t, self.width, self.scale))  # [B, E]
        if self.label_emb is not None:
            emb = emb + self.label_emb(label)  # [B, E]
        return emb


class ResBlock(nn.Module):
    """``skip(x) + conv(act(norm(conv(act(norm(x)))) + proj(emb)))``; 1x1 skip if channels change.

    The embedding is added *after* the second GroupNorm: added before it (as in
    DDPM), its spatially constant offset would be removed by the normalisation
    whenever a group holds a single channel.
    """

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int, padding_mode: str) -> None:
        super().__init__()
        self.norm1 = _norm(groups, c_in)
        self.conv1 = _conv3x3(c_in, c_out, padding_mode)
        self.emb_proj = nn.Linear(emb_dim, c_out)
        self.norm2 = _norm(groups, c_out)
        self.conv2 = _conv3x3(c_out, c_out, padding_mode)
        self.skip = nn.Conv2d(c_in, c_out, kernel_size=1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))  # [B, c_out, H, W]
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # [B, c_out, H, W]
        h = self.conv2(F.silu(h))  # [B, c_out, H, W]
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """``x + proj(MHA(norm(x)))``: multi-head self-attention over the ``H * W`` positions.

    The block of DDPM's UNet (Ho et al. 2020, App. B), with ``heads`` heads:
    queries, keys and values are 1x1 convolutions of the normalised features,
    each position attends to every position (softmax of ``q.k / sqrt(d)``,
    ``d = channels / heads``), and a 1x1 output projection is added back to
    ``x``. There is no positional encoding, so the block commutes with any
    permutation of the positions (circular shifts included), but every output
    depends on every input: the network is no longer local.

    The output projection starts at zero (as in DDPM), so at initialisation the
    block is the identity and the network starts as the UNet without attention;
    its gradient is not zero, so training moves it. Normalisation follows the
    network's ``norm_groups`` (0: none).

    Args:
        channels: Feature channels ``c``.
        heads: Attention heads; must divide ``channels``.
        groups: GroupNorm groups (0: no normalisation).
    """

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"heads={heads} must divide channels={channels}")
        self.heads = heads
        self.norm = _norm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)  # [B, 3, nh, d, N]
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each [B, nh, N, d]
        h = F.scaled_dot_product_attention(q, k, v)  # [B, nh, N, d]
        h = h.transpose(-1, -2).reshape(B, C, H, W)  # [B, C, H, W]
        return x + self.proj(h)


class _EpsNet(nn.Module):
    """Input checks shared by both networks."""

    config: ModelConfig

    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None) -> None:
        cfg = self.config
        C, S = cfg.in_channels, cfg.image_size
        if x_t.ndim != 4 or x_t.shape[1] != C or tuple(x_t.shape[2:]) != (S, S):
            raise ValueError(f"x_t must have shape [B, {C}, {S}, {S}], got {tuple(x_t.shape)}")
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape [B] = [{x_t.shape[0]}], got {tuple(t.shape)}")
        if cfg.num_classes and label is None:
            raise ValueError(f"this model is class-conditional ({cfg.num_classes} classes): pass a label")
        if not cfg.num_classes and label is not None:
            raise ValueError("this model is unconditional: label must be None")
        if label is not None and label.shape != t.shape:
            raise ValueError(f"label must have shape [B] = [{x_t.shape[0]}], got {tuple(label.shape)}")

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class MinimalResNet(_EpsNet):
    """Full-resolution residual network: conv, ``depth`` ResBlocks, norm-SiLU-conv.

    Args:
        config: Architecture; see :class:`ResNetConfig`.
    """

    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        w, pm = config.width, config.padding_mode
        emb_dim = 4 * w
        self.time_emb = TimeEmbedding(w, emb_dim, config.num_classes, config.time_scale)
        self.conv_in = _conv3x3(config.in_channels, w, pm)
        self.blocks = nn.ModuleList(ResBlock(w, w, emb_dim, config.norm_groups, pm) for _ in range(config.depth))
        self.norm_out = _norm(config.norm_groups, w)
        self.conv_out = _conv3x3(w, config.in_channels, pm)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise.

        Args:
            x_t: ``[B, C, H, W]`` noisy images.
            t: ``[B]`` float times in [0, 1].
            label: ``[B]`` long class indices (conditional models only).

        Returns:
            ``[B, C, H, W]`` eps_hat.
        """
        self._check_inputs(x_t, t, label)
        emb = self.time_emb(t, label)  # [B, 4w]
        h = self.conv_in(x_t)  # [B, w, H, W]
        for block in self.blocks:
            h = block(h, emb)  # [B, w, H, W]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, C, H, W]


class MinimalUNet(_EpsNet):
    """UNet: ResBlocks, 2x average-pool down, nearest up, concatenated skips, optional attention.

    Level ``l`` runs ``blocks_per_level`` blocks at ``base_width * channel_mults[l]``
    channels and resolution ``image_size / 2**l``. On the way up, the first block
    of each level takes the upsampled features concatenated with the skip saved
    at the end of the same level on the way down.

    With ``config.attention``, a :class:`SelfAttention` block sits in the middle,
    at the lowest resolution: after the last down block (whose output is saved
    as that level's skip) and before the first up block. Without it the network
    is exactly the attention-free UNet (same modules, same parameter names).

    Args:
        config: Architecture; see :class:`UNetConfig`.
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        pm, g = config.padding_mode, config.norm_groups
        widths = [config.base_width * m for m in config.channel_mults]
        emb_dim = 4 * config.base_width
        self.time_emb = TimeEmbedding(config.base_width, emb_dim, config.num_classes, config.time_scale)
        self.conv_in = _conv3x3(config.in_channels, widths[0], pm)
        n_blocks = config.blocks_per_level
        self.down = nn.ModuleList()
        c = widths[0]
        for w in widths:
            self.down.append(
                nn.ModuleList(ResBlock(c if i == 0 else w, w, emb_dim, g, pm) for i in range(n_blocks))
            )
            c = w
        self.mid_attention = SelfAttention(c, config.attention_heads, g) if config.attention else None
        self.up = nn.ModuleList()
        for w in reversed(widths):
            # first block: upsampled features (c channels) + skip of this level (w channels)
            self.up.append(
                nn.ModuleList(ResBlock(c + w if i == 0 else w, w, emb_dim, g, pm) for i in range(n_blocks))
            )
            c = w
        self.norm_out = _norm(g, widths[0])
        self.conv_out = _conv3x3(widths[0], config.in_channels, pm)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the noise; arguments and result as :meth:`MinimalResNet.forward`."""
        self._check_inputs(x_t, t, label)
        levels = len(self.down)
        emb = self.time_emb(t, label)  # [B, E]
        h = self.conv_in(x_t)  # [B, w_0, H, W]
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)  # [B, w_l, H / 2^l, W / 2^l]
            skips.append(h)
            if level < levels - 1:
                h = F.avg_pool2d(h, 2)  # [B, w_l, H / 2^(l+1), W / 2^(l+1)]
        if self.mid_attention is not None:
            h = self.mid_attention(h)  # [B, w_L, H / 2^L, W / 2^L], L = levels - 1
        for i, blocks in enumerate(self.up):
            level = levels - 1 - i
            if level < levels - 1:
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")  # [B, w_{l+1}, H / 2^l, W / 2^l]
            h = torch.cat([h, skips[level]], dim=1)  # [B, w_{l+1} + w_l, H / 2^l, W / 2^l]
            for block in blocks:
                h = block(h, emb)  # [B, w_l, H / 2^l, W / 2^l]
        return self.conv_out(F.silu(self.norm_out(h)))  # [B, C, H, W]


def build_model(config: ModelConfig) -> MinimalResNet | MinimalUNet:
    """The network described by ``config`` (initialised from torch's global RNG)."""
    if isinstance(config, ResNetConfig):
        return MinimalResNet(config)
    if isinstance(config, UNetConfig):
        return MinimalUNet(config)
    raise ValueError(f"not a model config: {type(config).__name__}")
