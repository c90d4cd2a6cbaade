"""Noise schedules, sigma grids and locality schedules k(sigma).

**One protocol, in sigma.** Every denoiser is a callable ``D(x, sigma) -> x0_hat``
in the variance-exploding (VE / EDM) form ``x = x0 + sigma * eps`` (Karras et
al. 2022, Eq. 1; k-diffusion). The paper's variance-preserving (VP) process
``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` (Kamb & Ganguli 2412.20292, App. B)
is a change of variables, done here and nowhere else:

    x_VE = x_t / sqrt(abar),     sigma^2 = (1 - abar) / abar,     abar = 1 / (1 + sigma^2)

(:func:`sigma_from_alpha_bar`, :func:`alpha_bar_from_sigma`). The posterior
mean is the same in both forms, so ``D(x_t / sqrt(abar), sigma) = E[x0 | x_t]``.

**Noise schedules** map a time t in [0, 1] to ``alpha_bar(t)`` and ``sigma(t)``:
:class:`CosineSchedule` is the cosine schedule of Nichol & Dhariwal (2021) that
the paper uses, ``alpha_bar(t) = cos^2((t / (1 + s)) * pi / 2)``, s = 0.008.

**Sigma grids** are 1-D float64 tensors of ``n + 1`` sigmas, descending, last
entry 0, for the samplers of :mod:`patchmosaic.samplers`:

* :func:`sigmas_cosine` -- the paper's DDIM grid ``t_i = i / n`` on the cosine schedule;
* :func:`sigmas_karras` -- EDM's grid (Karras et al. 2022, Eq. 5);
* :func:`sigmas_vp_linear` -- the DDPM linear-beta schedule subsampled as
  diffusers' ``DDIMScheduler`` does ("leading" or "trailing" spacing).

**Locality schedules** (:class:`PatchSchedule`) give the patch size k as a step
function of sigma: each size is keyed by the sigma of the grid point it was
published or calibrated at, and ``k(sigma)`` is the size of the key nearest to
sigma in log sigma (ties go to the lower-noise key; beyond the ends, the end
sizes). On the grid the schedule was made on this returns exactly the published
sizes; on any other grid or step count it applies the same locality at the same
noise level.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "GRIDS",
    "PRESETS",
    "CosineSchedule",
    "PatchSchedule",
    "ValueSchedule",
    "alpha_bar_from_sigma",
    "check_patch_size",
    "make_grid",
    "sigma_from_alpha_bar",
    "sigmas_cosine",
    "sigmas_karras",
    "sigmas_vp_linear",
    "time_grid",
]


def sigma_from_alpha_bar(alpha_bar: torch.Tensor | float) -> torch.Tensor:
    """VE noise level ``sigma = sqrt((1 - abar) / abar)`` of a VP signal fraction (float64)."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64)
    return torch.sqrt((1.0 - ab) / ab)


def alpha_bar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    """VP signal fraction ``abar = 1 / (1 + sigma^2)`` of a VE noise level (dtype of ``sigma``)."""
    sigma = torch.as_tensor(sigma)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float64)
    return 1.0 / (1.0 + sigma.square())


@dataclass(frozen=True)
class CosineSchedule:
    """Cosine noise schedule ``alpha_bar(t) = cos^2((t / (1 + s)) pi / 2)``.

    Attributes:
        s: Offset that keeps ``alpha_bar(1)`` above zero (paper: 0.008, so
            ``sigma(1) = 80.2``).
    """

    s: float = 0.008

    def alpha_bar(self, t: torch.Tensor | float) -> torch.Tensor:
        """Signal fraction ``alpha_bar(t)`` for ``t`` in [0, 1] (float64)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.cos(t / (1.0 + self.s) * (math.pi / 2)) ** 2

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """VE noise level ``sigma(t) = sqrt((1 - alpha_bar) / alpha_bar)`` (float64; 0 at t = 0)."""
        return sigma_from_alpha_bar(self.alpha_bar(t))

    def t_from_alpha_bar(self, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`alpha_bar` on [0, 1]."""
        alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64)
        return torch.acos(torch.sqrt(alpha_bar)) * (2.0 / math.pi) * (1.0 + self.s)

    def t_from_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`sigma`."""
        return self.t_from_alpha_bar(alpha_bar_from_sigma(torch.as_tensor(sigma, dtype=torch.float64)))


def _check_steps(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"steps must be a positive integer, got {n!r}")
    return n


def time_grid(steps: int) -> torch.Tensor:
    """The paper's DDIM time grid ``t_i = i / steps`` for ``i = steps, ..., 0`` (descending).

    Returns:
        ``[steps + 1]`` float64 tensor from 1 to 0.
    """
    steps = _check_steps(steps)
    return torch.arange(steps, -1, -1, dtype=torch.float64) / steps


def sigmas_cosine(n: int, schedule: CosineSchedule | None = None) -> torch.Tensor:
    """The paper's grid: sigma at ``t = 1, (n-1)/n, ..., 1/n``, then 0.

    Args:
        n: Number of steps (denoiser calls of a first-order sampler).
        schedule: Noise schedule (default: :class:`CosineSchedule` with s = 0.008).

    Returns:
        ``[n + 1]`` float64, descending, last entry 0.
    """
    schedule = CosineSchedule() if schedule is None else schedule
    sigmas = schedule.sigma(time_grid(n))  # [n + 1]
    sigmas[-1] = 0.0
    return sigmas


def sigmas_karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """EDM's grid (Karras et al. 2022, Eq. 5), then 0.

    ``sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0, ..., n - 1`` (``n = 1``: ``sigma_max`` alone), ``sigma_n = 0``.

    Returns:
        ``[n + 1]`` float64, descending, last entry 0.
    """
    n = _check_steps(n)
    if not 0 < sigma_min < sigma_max or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.zeros(1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho  # [n]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# DDPM's linear-beta training schedule (Ho et al. 2020): 1000 steps, beta 1e-4 .. 0.02.
VP_LINEAR = {"beta_start": 1e-4, "beta_end": 0.02, "train_steps": 1000}


def sigmas_vp_linear(n: int, spacing: str = "leading") -> torch.Tensor:
    """DDPM's linear-beta schedule subsampled to ``n`` steps as diffusers' ``DDIMScheduler`` does.

    ``alphas_cumprod = cumprod(1 - linspace(1e-4, 0.02, 1000))`` (float32, as
    diffusers computes it); the timesteps are ``"leading"``:
    ``(arange(n) * (1000 // n))`` descending, or ``"trailing"``:
    ``round(arange(1000, 0, -1000 / n)) - 1``; sigma at each timestep is
    ``sqrt((1 - abar) / abar)``, then 0 (``set_alpha_to_one``).

    Returns:
        ``[n + 1]`` float64, descending, last entry 0.
    """
    n = _check_steps(n)
    T = VP_LINEAR["train_steps"]
    if n > T:
        raise ValueError(f"vp-linear grids have at most {T} steps (the training schedule's length), got {n}")
    betas = torch.linspace(VP_LINEAR["beta_start"], VP_LINEAR["beta_end"], T, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)  # [T]
    if spacing == "leading":
        timesteps = torch.arange(n - 1, -1, -1, dtype=torch.long) * (T // n)
    elif spacing == "trailing":
        steps = torch.arange(T, 0, -T / n, dtype=torch.float64)
        timesteps = torch.round(steps).to(torch.long) - 1
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected 'leading' or 'trailing'")
    sigmas = sigma_from_alpha_bar(alphas_cumprod[timesteps])  # [n]
    return torch.cat([sigmas, sigmas.new_zeros(1)])


# Named grids for the CLI: name -> (n -> sigmas).
GRIDS: dict[str, Callable[[int], torch.Tensor]] = {
    "cosine": sigmas_cosine,
    "karras": sigmas_karras,
    "vp-linear": sigmas_vp_linear,
    "vp-linear-trailing": lambda n: sigmas_vp_linear(n, "trailing"),
}


def make_grid(name: str, n: int) -> torch.Tensor:
    """The named grid (:data:`GRIDS`) with ``n`` steps."""
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; expected one of {', '.join(GRIDS)}")
    return GRIDS[name](n)


def check_patch_size(k: object) -> int:
    """Return ``k`` as an int if it is a positive odd integer, else raise ValueError."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"patch size must be an odd positive integer, got {k!r}")
    if k <= 0:
        raise ValueError(f"patch size must be positive, got {k}")
    if k % 2 == 0:
        raise ValueError(f"patch size must be odd (a centred k x k window), got {k}")
    return k


def _key_index(log_midpoints: Sequence[float], sigma: float | torch.Tensor, what: str) -> int:
    """Index of the sigma key nearest to ``sigma`` in log sigma (ties: the lower-noise key; ends extend)."""
    sigma = float(sigma)
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"a {what} is defined for finite sigma > 0, got {sigma}")
    return bisect.bisect_left(log_midpoints, math.log(sigma))


def _check_window_size(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"window size must be a positive integer, got {k!r}")
    return k


@dataclass(frozen=True)
class PatchSchedule:
    """Locality schedule k(sigma): a step function of the noise level.

    ``sizes[i]`` is keyed by ``sigmas[i]`` (both lowest noise first); ``k(sigma)``
    is the size whose key is nearest to ``sigma`` in log sigma (ties go to the
    lower-noise key, and sigmas beyond the ends get the end sizes).

    Attributes:
        sizes: Odd patch sizes, lowest noise first.
        sigmas: Their keys, strictly ascending VE sigmas. ``None`` keys ``sizes``
            to the paper's 20-step-style cosine grid of ``len(sizes)`` steps:
            ``sizes[i - 1]`` at ``t = i / n`` (how the published and the step-indexed
            calibrated schedules are defined).
        name: Where the schedule came from (preset name, file path or "explicit").
        centred: Sizes of centred k x k windows, which must be odd (the patch
            machines). False for uncentred P x P windows (PSPC-Square), any size >= 1.
    """

    sizes: tuple[int, ...]
    sigmas: tuple[float, ...] | None = None
    name: str = "explicit"
    centred: bool = True

    def __post_init__(self) -> None:
        if len(self.sizes) == 0:
            raise ValueError("a patch-size schedule needs at least one size")
        check = check_patch_size if self.centred else _check_window_size
        object.__setattr__(self, "sizes", tuple(check(k) for k in self.sizes))
        sigmas = self.sigmas
        if sigmas is None:
            sigmas = sigmas_cosine(len(self.sizes)).flip(0)[1:].tolist()  # t = 1/n, ..., 1
        keys, mids = _check_sigma_keys(sigmas, len(self.sizes), "patch-size", "size")
        object.__setattr__(self, "sigmas", keys)
        object.__setattr__(self, "_log_midpoints", mids)

    def __len__(self) -> int:
        return len(self.sizes)

    def size_at(self, sigma: float | torch.Tensor) -> int:
        """Patch size at noise level ``sigma`` (a positive float)."""
        return self.sizes[_key_index(self._log_midpoints, sigma, "patch size")]

    __call__ = size_at

    def on_grid(self, sigmas: torch.Tensor | Sequence[float]) -> tuple[int, ...]:
        """The sizes used at the nonzero sigmas of a sampler grid, in grid order."""
        return tuple(self.size_at(s) for s in torch.as_tensor(sigmas).tolist() if s > 0)

    @classmethod
    def from_steps(
        cls, sizes: Sequence[int], schedule: CosineSchedule | None = None, *, name: str = "explicit"
    ) -> "PatchSchedule":
        """Key step-indexed sizes (``sizes[i - 1]`` at ``t = i / n``) to the sigmas of ``schedule``."""
        sigmas = sigmas_cosine(len(sizes), schedule).flip(0)[1:].tolist() if len(sizes) else []
        return cls(tuple(sizes), tuple(sigmas), name=name)

    @classmethod
    def parse(cls, spec: str) -> "PatchSchedule":
        """Resolve a preset name, a comma-separated list or a schedule file.

        Args:
            spec: ``"mnist-resnet-zeros"`` (see :data:`PRESETS`), ``"3,3,5,..."``
                (lowest noise first, keyed to the cosine grid of that many steps) or
                a path to a JSON file written by :meth:`save`.
        """
        spec = spec.strip()
        if spec in PRESETS:
            return PRESETS[spec]
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
        """Read a schedule file: JSON with ``patch_sizes`` and ``sigmas`` (both lowest noise first).

        Files without ``sigmas`` (written before schedules were keyed by sigma) hold
        step-indexed sizes on the paper's cosine grid and load as such.
        """
        path = Path(path)
        what = f"{path} is not a schedule file (a JSON object with a 'patch_sizes' list)"
        data = _read_schedule_json(path, what)
        if not isinstance(data, dict) or not isinstance(data.get("patch_sizes"), list):
            raise ValueError(what)
        sigmas = data.get("sigmas")
        if sigmas is not None and not isinstance(sigmas, list):
            raise ValueError(f"{path}: 'sigmas' must be a list of ascending noise levels")
        try:
            return cls(tuple(data["patch_sizes"]), None if sigmas is None else tuple(sigmas), name=str(path),
                       centred=bool(data.get("centred", True)))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err

    def save(self, path: str | Path, **metadata: object) -> None:
        """Write the schedule as JSON (sizes and their sigma keys, lowest noise first), with metadata."""
        payload = {
            "patch_sizes": list(self.sizes),
            "sigmas": list(self.sigmas),
            "order": "lowest noise first: patch_sizes[i] is used at the sigmas nearest (in log sigma) to sigmas[i]",
            **({} if self.centred else {"centred": False}),
            **metadata,
        }
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _read_schedule_json(path: Path, what: str) -> object:
    """The JSON in a schedule file (FileNotFoundError if missing; ValueError ``what: ...`` if unreadable)."""
    if not path.is_file():
        raise FileNotFoundError(f"schedule file not found: {path}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{what}: {err}") from err


def _check_sigma_keys(sigmas: Sequence[float], n: int, what: str,
                      entry: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Validated ascending sigma keys (one per entry) and the log-sigma midpoints between them."""
    keys = tuple(float(s) for s in sigmas)
    if len(keys) != n:
        raise ValueError(f"a {what} schedule needs one sigma per {entry}: {n} {entry}s, {len(keys)} sigmas")
    if not all(math.isfinite(s) and s > 0 for s in keys):
        raise ValueError(f"schedule sigmas must be finite and positive, got {list(keys)}")
    if any(b <= a for a, b in zip(keys, keys[1:])):
        raise ValueError(f"schedule sigmas must be strictly ascending (lowest noise first), got {list(keys)}")
    logs = [math.log(s) for s in keys]
    return keys, tuple((a + b) / 2 for a, b in zip(logs, logs[1:]))


@dataclass(frozen=True)
class ValueSchedule:
    """A sigma-keyed schedule of a denoiser's scalar knob: data-locality's ``threshold``, smoothed's ``std``.

    ``values[i]`` is keyed by ``sigmas[i]`` (both lowest noise first); the value at
    ``sigma`` is the one whose key is nearest in log sigma, exactly as
    :meth:`PatchSchedule.size_at` (``patchmosaic calibrate --denoiser data-locality``
    / ``smoothed`` writes one).

    Attributes:
        parameter: The knob's name (``threshold``, ``std``); a file for one knob is refused for another.
        values: Finite values, lowest noise first.
        sigmas: Their keys, strictly ascending VE sigmas.
        name: Where the schedule came from (file path or "explicit").
    """

    parameter: str
    values: tuple[float, ...]
    sigmas: tuple[float, ...]
    name: str = "explicit"

    def __post_init__(self) -> None:
        if not self.parameter:
            raise ValueError("a value schedule names its parameter")
        if len(self.values) == 0:
            raise ValueError(f"a {self.parameter} schedule needs at least one value")
        values = tuple(float(v) for v in self.values)
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{self.parameter} schedule values must be finite, got {list(values)}")
        keys, mids = _check_sigma_keys(self.sigmas, len(values), self.parameter, "value")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "sigmas", keys)
        object.__setattr__(self, "_log_midpoints", mids)

    def __len__(self) -> int:
        return len(self.values)

    def value_at(self, sigma: float | torch.Tensor) -> float:
        """The value at noise level ``sigma`` (a positive float)."""
        return self.values[_key_index(self._log_midpoints, sigma, self.parameter)]

    __call__ = value_at

    def on_grid(self, sigmas: torch.Tensor | Sequence[float]) -> tuple[float, ...]:
        """The values used at the nonzero sigmas of a sampler grid, in grid order."""
        return tuple(self.value_at(s) for s in torch.as_tensor(sigmas).tolist() if s > 0)

    def to_dict(self) -> dict[str, object]:
        """JSON-able record (parameter, values, sigmas, source)."""
        return {"parameter": self.parameter, "values": list(self.values), "sigmas": list(self.sigmas),
                "source": self.name}

    def save(self, path: str | Path, **metadata: object) -> None:
        """Write the schedule as JSON (values and their sigma keys, lowest noise first), with metadata."""
        payload = {
            "parameter": self.parameter,
            "values": list(self.values),
            "sigmas": list(self.sigmas),
            "order": "lowest noise first: values[i] is used at the sigmas nearest (in log sigma) to sigmas[i]",
            **metadata,
        }
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path, parameter: str | None = None) -> ValueSchedule:
        """Read a file written by :meth:`save`; ``parameter`` (if given) must be the one it schedules."""
        path = Path(path)
        if path.is_dir():
            path = path / "schedule.json"
        what = f"{path} is not a value schedule file (a JSON object with 'parameter', 'values' and 'sigmas')"
        data = _read_schedule_json(path, what)
        if isinstance(data, dict) and "patch_sizes" in data:
            raise ValueError(f"{path} is a patch-size schedule (patch_sizes), not a {parameter or 'value'} schedule")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("values", "sigmas")):
            raise ValueError(what)
        if parameter is not None and data.get("parameter") != parameter:
            raise ValueError(f"{path} schedules {data.get('parameter')!r}, not {parameter!r}")
        try:
            return cls(str(data.get("parameter", "")), tuple(data["values"]), tuple(data["sigmas"]), name=str(path))
        except (ValueError, TypeError) as err:
            raise ValueError(f"{path}: {err}") from err


# Published calibrated locality schedules (Kamb & Ganguli 2025, released code),
# 20 steps each, lowest noise first: entry i - 1 is k at t = i / 20 of the cosine
# schedule, i.e. keyed to sigmas_cosine(20).
_PAPER_SCHEDULES: dict[str, tuple[int, ...]] = {
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

# PSPC-Square window sizes for CIFAR-10 (Niedoba et al. 2411.19339) on EDM's
# 18-step Karras grid (sigma_min 0.002, sigma_max 80, rho 7), sigma high to low.
PSPC_CIFAR10_SIZES = (32,) * 7 + (23, 15, 11, 7, 5) + (3,) * 6

# Every named locality schedule: name -> sigma-keyed PatchSchedule.
PRESETS: dict[str, PatchSchedule] = {
    **{name: PatchSchedule.from_steps(sizes, name=name) for name, sizes in _PAPER_SCHEDULES.items()},
    "cifar10-pspc-square": PatchSchedule(
        PSPC_CIFAR10_SIZES[::-1], tuple(sigmas_karras(18)[:-1].flip(0).tolist()), name="cifar10-pspc-square",
        centred=False,
    ),
}
