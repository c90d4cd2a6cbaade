"""Trained networks as denoisers ``D(x, sigma) -> x0_hat`` (k-diffusion's ``external`` wrappers).

A network trained on the VP process ``x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps``
with a time input t predicts ``eps_hat(x_t, t)``. In VE variables
``x = x_t / sqrt(abar)``, ``sigma^2 = (1 - abar) / abar``, so the network is
evaluated at ``x_t = x / sqrt(1 + sigma^2)`` and ``t = t(sigma)`` of its own noise
schedule, and ``x0_hat = x - sigma * eps_hat`` (invert ``x = x0 + sigma eps``).
"""

from __future__ import annotations

import torch
from torch import nn

from patchmosaic.denoisers.base import sigma_vector
from patchmosaic.schedules import CosineSchedule

__all__ = ["EpsDenoiser"]


class EpsDenoiser:
    """An eps-predicting network as a denoiser ``D(x, sigma) -> x0_hat``.

    The network runs under ``torch.no_grad`` in eval mode on its own device and
    dtype; the result comes back in the dtype and device of ``x``.

    Args:
        model: A :class:`~patchmosaic.models.MinimalResNet`/:class:`~patchmosaic.models.MinimalUNet`
            (anything with a ``config`` and ``forward(x_t, t [B], label)``).
        schedule: Noise schedule the model was trained with (maps sigma to its t).
        label: Class for conditional models: an int or a ``[B]`` tensor.
        clip: Clamp x0_hat to [-1, 1] (off by default, as in the paper; note
            ``sigma(1) ~ 80``, so x0_hat at the first step can be far outside).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        schedule: CosineSchedule | None = None,
        label: int | torch.Tensor | None = None,
        clip: bool = False,
    ) -> None:
        self.model = model
        self.schedule = CosineSchedule() if schedule is None else schedule
        self.clip = clip
        self.num_classes = int(getattr(getattr(model, "config", None), "num_classes", 0))
        if label is not None:
            self._check_label(label)
        self.label = label

    def __repr__(self) -> str:
        return f"EpsDenoiser({type(self.model).__name__}, label={self.label!r}, clip={self.clip})"

    def _check_label(self, label: int | torch.Tensor) -> None:
        if not self.num_classes:
            raise ValueError("label given but the model is unconditional (num_classes = 0)")
        lab = torch.as_tensor(label)
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool or lab.ndim > 1:
            raise ValueError(f"label must be an int or an integer [B] tensor, got {lab.dtype} {tuple(lab.shape)}")
        if lab.numel() and (int(lab.min()) < 0 or int(lab.max()) >= self.num_classes):
            raise ValueError(f"label(s) {sorted(set(lab.flatten().tolist()))} out of range 0..{self.num_classes - 1}")

    def bind(self, *, label: int | torch.Tensor | None = None, patch_sizes: object = None, **_: object) -> "EpsDenoiser":
        """A copy with ``label`` bound (the hook :func:`patchmosaic.sample` calls).

        Raises:
            ValueError: If ``patch_sizes`` is given (a network has no locality
                schedule), or the label does not fit the model.
        """
        if patch_sizes is not None:
            raise ValueError("patch_sizes do not apply to a trained network (it has no locality schedule); pass None")
        if label is None and self.label is None and self.num_classes:
            raise ValueError(f"the model is class-conditional ({self.num_classes} classes): pass a label")
        return EpsDenoiser(
            self.model, schedule=self.schedule, label=self.label if label is None else label, clip=self.clip
        )

    def _label_vector(self, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.label is None:
            if self.num_classes:
                raise ValueError(f"the model is class-conditional ({self.num_classes} classes): bind a label")
            return None
        lab = torch.as_tensor(self.label, dtype=torch.long)
        lab = lab.expand(batch) if lab.ndim == 0 else lab
        if lab.shape != (batch,):
            raise ValueError(f"label must be an int or a [B] = [{batch}] tensor, got shape {tuple(lab.shape)}")
        return lab.to(device)

    @torch.no_grad()
    def eps(self, x_t: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """The network's noise prediction ``eps_hat(x_t, t)`` (VP inputs), ``[B, C, H, W]`` in x_t's dtype."""
        param = next(self.model.parameters())
        was_training = self.model.training
        self.model.eval()
        try:
            B = x_t.shape[0]
            x = x_t.to(device=param.device, dtype=param.dtype)  # [B, C, H, W]
            tt = torch.as_tensor(t, dtype=torch.float64).expand(B).to(device=param.device, dtype=param.dtype)  # [B]
            out = self.model(x, tt, self._label_vector(B, param.device))  # [B, C, H, W]
        finally:
            self.model.train(was_training)
        return out.to(device=x_t.device, dtype=x_t.dtype).contiguous()  # [B, C, H, W] (channels-last networks)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """``x0_hat = x - sigma * eps_hat(x / sqrt(1 + sigma^2), t(sigma))``, ``[B, C, H, W]``."""
        if not torch.is_tensor(x) or x.ndim != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a float [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        sig = sigma_vector(sigma, x)  # [B]
        s64 = sig.to(torch.float64)
        t = self.schedule.t_from_sigma(s64.cpu())  # [B] float64
        x_t = x / torch.sqrt(1.0 + s64.square()).to(x.dtype)[:, None, None, None]  # [B, C, H, W]
        x0 = x - sig[:, None, None, None] * self.eps(x_t, t)  # [B, C, H, W]
        return x0.clamp(-1.0, 1.0) if self.clip else x0
