"""Noise and locality schedules.

The noise schedule is the cosine schedule of Nichol & Dhariwal (2021) used by
Kamb & Ganguli (2412.20292, App. B): ``alpha_bar(t) = cos^2((t / (1 + s)) * pi / 2)``
with ``s = 0.008``, so the forward process is
``x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps``.

The locality schedule k(t) (:class:`PatchSchedule`) gives the patch size the
ELS/LS machines use at each point of the sampler's time grid
``t_i = i / steps``. Sizes are stored *lowest noise first*: ``sizes[i - 1]`` is
the size used at ``t = i / steps``, the order of the paper's published
schedules.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "CosineSchedule",
    "PatchSchedule",
    "PRESETS",
    "time_grid",
]


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine noise schedule ``alpha_bar(t) = cos^2((t / (1 + s)) pi / 2)``.

    Attributes:
        s: Offset that keeps ``alpha_bar(1)`` above zero (paper: 0.008).
    """

    s: float = 0.008

    def alpha_bar(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal fraction ``alpha_bar(t)`` for ``t`` in [0, 1]."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.cos(t / (1.0 + self.s) * (math.pi / 2)) ** 2

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise standard deviation ``sqrt(1 - alpha_bar(t))``."""
        return torch.sqrt(1.0 - self.alpha_bar(t))

    def t_from_alpha_bar(self, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`alpha_bar` on [0, 1]."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        return torch.acos(torch.sqrt(alpha_bar)) * (2.0 / math.pi) * (1.0 + self.s)


def time_grid(steps: int) -> torch.Tensor:
    """The sampler's grid ``t_i = i / steps`` for ``i = steps, ..., 0`` (descending).

    Returns:
        ``[steps + 1]`` float64 tensor from 1 to 0.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.arange(steps, -1, -1, dtype=torch.float64) / steps


# Published calibrated locality schedules (Kamb & Ganguli 2025, released code),
# 20 steps each, lowest noise first: entry i - 1 is k at t = i / 20.
PRESETS: dict[str, tuple[int, ...]] = {
    "mnist-resnet-zeros": (3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15),
    "mnist-resnet-circular": (3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3),
    "mnist-unet-zeros": (3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27),
    "fashion-resnet-zeros": (3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17),
    "fashion-unet-zeros": (3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25, 25, 25),
    "cifar10-resnet-zeros": (3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17),
    "cifar10-resnet-circular": (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15),
    "cifar10-unet-zeros": (3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25),
    "celeba-resnet-zeros": (3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19),
    "celeba-unet-zeros": (3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27),
}


def check_patch_size(k: object) -> int:
    """Return ``k`` as an int if it is a positive odd integer, else raise ValueError."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"patch size must be an odd positive integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"patch size must be positive, got {k}")
    if k % 2 == 0:
        raise ValueError(f"patch size must be odd (a centred k x k window), got {k}")
    return k


@dataclass(frozen=True)
class PatchSchedule:
    """Locality schedule k(t) on the grid ``t_i = i / n``, ``n = len(sizes)``.

    Attributes:
        sizes: Patch sizes, lowest noise first: ``sizes[i - 1]`` is k at ``t = i / n``.
        name: Where the schedule came from (preset name, file path or "explicit").
    """

    sizes: tuple[int, ...]
    name: str = "explicit"

    def __post_init__(self) -> None:
        if len(self.sizes) == 0:
            raise ValueError("a patch-size schedule needs at least one size")
        object.__setattr__(self, "sizes", tuple(check_patch_size(k) for k in self.sizes))

    @property
    def steps(self) -> int:
        """Number of grid points ``n`` the schedule is defined on."""
        return len(self.sizes)

    def index(self, t: float) -> int:
        """Index into :attr:`sizes` for time ``t = i / n`` (that is, ``i - 1``)."""
        i = round(float(t) * self.steps)
        if abs(float(t) * self.steps - i) > 1e-6 or not 1 <= i <= self.steps:
            raise ValueError(
                f"t={float(t)!r} is not on this schedule's grid i/{self.steps}, i = 1..{self.steps}"
            )
        return i - 1

    def at(self, t: float) -> int:
        """Patch size k at time ``t`` (must lie on the grid ``i / n``, ``i >= 1``)."""
        return self.sizes[self.index(t)]

    @classmethod
    def parse(cls, spec: str) -> "PatchSchedule":
        """Resolve a preset name, a comma-separated list or a schedule file.

        Args:
            spec: ``"mnist-resnet-zeros"`` (see :data:`PRESETS`), ``"3,3,5,..."``
                (lowest noise first) or a path to a JSON file written by :meth:`save`.
        """
        spec = spec.strip()
        if spec in PRESETS:
            return cls(PRESETS[spec], name=spec)
        if spec and all(part.strip().lstrip("-").isdigit() for part in spec.split(",")):
            return cls(tuple(int(part) for part in spec.split(",")), name="explicit")
        path = Path(spec)
        if path.suffix == ".json" or path.exists():
            return cls.load(path)
        raise ValueError(
            f"unknown patch-size schedule {spec!r}: not a preset ({', '.join(sorted(PRESETS))}), "
            "not a comma-separated list of odd sizes and not an existing schedule file"
        )

    @classmethod
    def load(cls, path: str | Path) -> "PatchSchedule":
        """Read a schedule file (JSON with key ``patch_sizes``, lowest noise first)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"schedule file not found: {path}")
        try:
            data = json.loads(path.read_text())
            sizes = data["patch_sizes"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(
                f"{path} is not a schedule file (JSON object with a 'patch_sizes' list)"
            ) from err
        if not isinstance(sizes, list):
            raise ValueError(f"{path}: 'patch_sizes' must be a list of odd integers")
        return cls(tuple(sizes), name=str(path))

    def save(self, path: str | Path, **metadata: object) -> None:
        """Write the schedule as JSON (lowest noise first), with optional metadata."""
        payload = {
            "patch_sizes": list(self.sizes),
            "order": "lowest noise first: patch_sizes[i-1] is used at t = i/steps",
            "steps": self.steps,
            **metadata,
        }
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
