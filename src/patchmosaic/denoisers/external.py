"""Networks of other libraries as denoisers ``D(x, sigma)`` (k-diffusion's ``external`` wrappers).

A diffusers ``UNet2DModel`` is trained on the discrete VP process
``x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps`` at integer timesteps
``k = 0..T-1`` of its scheduler's ``alphas_cumprod`` (``abar``). In VE variables
its timestep k sits at ``sigma_k = sqrt((1 - abar_k) / abar_k)`` (increasing in k).

``D(x, sigma)``, for any sigma > 0:

1. ``x_t = x / sqrt(1 + sigma^2)`` (exact: ``abar = 1 / (1 + sigma^2)``);
2. the timestep fed to the network is interpolated linearly in log sigma between
   the two neighbouring training timesteps, ``k + (log sigma - log sigma_k) /
   (log sigma_{k+1} - log sigma_k)`` (a float: the UNet's sinusoidal embedding
   takes any real t), clamped to ``[0, T-1]`` outside the trained range. At a
   training timestep's own sigma this is exactly that integer timestep;
3. the output is converted to x0 with the same ``abar = 1 / (1 + sigma^2)``:
   ``epsilon``: ``x0 = x - sigma eps_hat``; ``sample``: ``x0 = out``;
   ``v_prediction``: ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v_hat``.

The training images are assumed in [-1, 1] (diffusers' convention). Weights
are read with ``use_safetensors=True`` only: no pickled code is executed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from patchmosaic.denoisers.base import sigma_vector

__all__ = ["PREDICTION_TYPES", "DiffusersDenoiser", "load_diffusers_unet", "timestep_from_sigma"]

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")


def timestep_from_sigma(sigma: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The (fractional) training timestep of each sigma: linear in log sigma between neighbours.

    Args:
        sigma: ``[B]`` noise levels > 0.
        alphas_cumprod: ``[T]`` the scheduler's abar_k, decreasing.

    Returns:
        ``[B]`` float64 timesteps in ``[0, T-1]`` (exact integers at each ``sigma_k``).
    """
    abar = alphas_cumprod.to(torch.float64)  # [T]
    log_sk = 0.5 * torch.log((1.0 - abar) / abar)  # [T] log sigma_k, increasing
    ls = torch.log(sigma.to(torch.float64).cpu())  # [B]
    T = abar.numel()
    idx = torch.searchsorted(log_sk, ls).clamp(1, T - 1)  # [B]: log_sk[idx-1] < ls <= log_sk[idx]
    lo, hi = log_sk[idx - 1], log_sk[idx]  # [B], [B]
    frac = ((ls - lo) / (hi - lo)).clamp(0.0, 1.0)  # [B]
    return (idx - 1).to(torch.float64) + frac


class DiffusersDenoiser:
    """A diffusers-style VP network ``model(x_t, t).sample`` as ``D(x, sigma) -> x0_hat`` (module docstring).

    Args:
        model: A module called as ``model(x_t [B, C, H, W], t [B])`` returning a tensor
            or an object with ``.sample`` (diffusers' ``UNet2DOutput``).
        alphas_cumprod: ``[T]`` abar_k of its scheduler.
        prediction_type: ``epsilon``, ``sample`` or ``v_prediction``.
    """

    num_classes = 0  # class-conditional diffusers models are refused at load time

    def __init__(self, model: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r} is not supported; expected one of "
                             f"{', '.join(PREDICTION_TYPES)}")
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()  # [T]
        if abar.numel() < 2 or not ((abar > 0) & (abar < 1)).all() or not (abar[1:] < abar[:-1]).all():
            raise ValueError("alphas_cumprod must hold >= 2 values in (0, 1), strictly decreasing")
        self.model = model
        self.alphas_cumprod = abar
        self.prediction_type = prediction_type

    def __repr__(self) -> str:
        return (f"DiffusersDenoiser({type(self.model).__name__}, T={self.alphas_cumprod.numel()}, "
                f"prediction_type={self.prediction_type!r})")

    @property
    def sigmas(self) -> torch.Tensor:
        """``[T]`` the sigma of each training timestep (float64, increasing)."""
        return torch.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)

    def bind(self, *, label: Any = None, patch_sizes: object = None, **_: object) -> DiffusersDenoiser:
        if patch_sizes is not None:
            raise ValueError("patch_sizes do not apply to a trained network (it has no locality schedule); pass None")
        if label is not None:
            raise ValueError("label given but the diffusers model is unconditional")
        return self

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a float [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        sig = sigma_vector(sigma, x)  # [B]
        s64 = sig.to(torch.float64)
        t = timestep_from_sigma(s64, self.alphas_cumprod)  # [B] float64
        abar = 1.0 / (1.0 + s64.square())  # [B] of the actual sigma (not of the clamped t)
        x_t = x * torch.sqrt(abar).to(x.dtype)[:, None, None, None]  # [B, C, H, W]
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model(x_t.to(device=param.device, dtype=param.dtype), t.to(device=param.device, dtype=param.dtype))
        finally:
            self.model.train(was_training)
        out = getattr(out, "sample", out).to(device=x.device, dtype=x.dtype)  # [B, C, H, W]
        if self.prediction_type == "epsilon":
            return x - sig[:, None, None, None] * out
        if self.prediction_type == "sample":
            return out
        a = abar.to(x.dtype)[:, None, None, None]  # [B, 1, 1, 1]
        return torch.sqrt(a) * x_t - torch.sqrt(1.0 - a) * out  # v_prediction


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _layout(directory: Path) -> tuple[Path, Path]:
    """``(unet folder, scheduler_config.json)``: a flat folder or a pipeline folder with unet/ and scheduler/."""
    for unet, sched in ((directory, directory / "scheduler_config.json"),
                        (directory / "unet", directory / "scheduler" / "scheduler_config.json")):
        if (unet / "config.json").is_file() and sched.is_file():
            return unet, sched
    raise FileNotFoundError(
        f"{directory} holds no diffusers UNet with its scheduler: expected config.json + "
        "diffusion_pytorch_model.safetensors + scheduler_config.json (UNet2DModel.save_pretrained and "
        "scheduler.save_pretrained into one folder), or a pipeline folder with unet/ and scheduler/"
    )


def load_diffusers_unet(directory: str | Path) -> tuple[DiffusersDenoiser, dict[str, Any]]:
    """Load a locally saved diffusers ``UNet2DModel`` and its DDPM/DDIM scheduler config as a denoiser.

    Returns:
        ``(denoiser, record)`` with record = ``{"directory", "unet_config", "scheduler_config",
        "num_train_timesteps", "prediction_type", "shape"}``.

    Raises:
        ImportError: diffusers is not installed.
        FileNotFoundError: The folder lacks the files.
        ValueError: Another model or scheduler class, a class-conditional model,
            or an unsupported prediction type.
    """
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"diffusers model folder not found: {directory}")
    unet_dir, sched_path = _layout(directory)
    unet_cfg = _read_json(unet_dir / "config.json")
    sched_cfg = _read_json(sched_path)
    if unet_cfg.get("_class_name") != "UNet2DModel":
        raise ValueError(f"{unet_dir / 'config.json'}: a {unet_cfg.get('_class_name')!r}; only UNet2DModel is supported")
    if sched_cfg.get("_class_name") not in SCHEDULER_CLASSES:
        raise ValueError(f"{sched_path}: a {sched_cfg.get('_class_name')!r}; expected one of "
                         f"{', '.join(SCHEDULER_CLASSES)} (betas -> alphas_cumprod)")
    if unet_cfg.get("num_class_embeds") or unet_cfg.get("class_embed_type"):
        raise ValueError(f"{unet_dir}: class-conditional diffusers UNets are not supported (unconditional only)")
    prediction = sched_cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{sched_path}: prediction_type {prediction!r} is not supported; expected one of "
                         f"{', '.join(PREDICTION_TYPES)}")
    if not (unet_dir / "diffusion_pytorch_model.safetensors").is_file():
        raise FileNotFoundError(f"{unet_dir} has no diffusion_pytorch_model.safetensors; only safetensors weights "
                                "are loaded (no pickled checkpoints)")
    try:
        import diffusers
    except ImportError as err:
        raise ImportError("--model diffusers:DIR needs the optional extra: pip install 'patchmosaic[diffusers]' "
                          f"(or pip install diffusers); import failed: {err}") from err
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True)
    abar = scheduler.alphas_cumprod.detach().to(torch.float64)  # [T]
    denoiser = DiffusersDenoiser(unet, abar, prediction)
    channels, side = int(unet.config.in_channels), unet.config.sample_size
    side = int(side if isinstance(side, int) else side[0])
    record = {
        "directory": str(directory),
        "unet_config": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "scheduler_config": sched_cfg,
        "num_train_timesteps": int(abar.numel()),
        "prediction_type": prediction,
        "sigma_range": [float(denoiser.sigmas[0]), float(denoiser.sigmas[-1])],
        "shape": [channels, side, side],
    }
    return denoiser, json.loads(json.dumps(record, default=_jsonable))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
