"""Patch provenance: which training patches made each generated pixel.

The ELS machine's output pixel is a softmax-weighted average of training patch
centres (Kamb & Ganguli 2412.20292, Eq. 9): a "locally consistent patch
mosaic". :meth:`patchmosaic.ScoreMachine.denoise_provenance` reports, from the
same streaming pass, each pixel's top candidates (training image, patch centre
q, weight), ``N_eff = 1 / sum w^2`` and the posterior entropy;
:class:`ProvenanceRecorder` keeps them along a sampler's trajectory (top
candidates at the final step, ``N_eff`` and entropy at every step) and
:func:`patchmosaic.runs.save_provenance` writes them next to ``samples.npz``.

Candidate ids inside the engine are ``(image * H + q_row) * W + q_col`` for
patch machines and ``image * shifts + shift`` for IS/ES.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from patchmosaic.engine import SoftmaxMean
from patchmosaic.geometry import AxisBlocks, scatter_pixels

__all__ = ["Provenance", "ProvenanceRecorder"]



@dataclass(frozen=True)
class Provenance:
    """Per-pixel provenance of one machine call.

    Attributes:
        index: ``[B, H, W, m]`` training image index of each entry (-1: empty slot).
        source: ``[B, H, W, m, 2]`` centre ``(q_row, q_col)`` of the source patch in that image.
        weight: ``[B, H, W, m]`` posterior weight of the entry, descending along m.
        count: ``[B, H, W, m]`` training positions the entry stands for (1, or the number
            of identical constant patches it groups; 0 for an empty slot).
        n_eff: ``[B, H, W]`` effective number of contributing patches ``1 / sum w^2``.
        entropy: ``[B, H, W]`` posterior entropy ``-sum w log w`` in nats.
    """

    index: torch.Tensor
    source: torch.Tensor
    weight: torch.Tensor
    count: torch.Tensor
    n_eff: torch.Tensor
    entropy: torch.Tensor

    @property
    def top(self) -> int:
        """Entries per pixel, m."""
        return self.index.shape[-1]

    @staticmethod
    def _decode(ids: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch-machine ids -> ``index [...]`` and ``source [..., 2]`` (-1 and 0 for empty slots)."""
        empty = ids < 0
        index = torch.where(empty, -1, ids // (H * W))
        pos = torch.where(empty, 0, ids % (H * W))
        return index, torch.stack([pos // W, pos % W], dim=-1)

    @classmethod
    def from_patches(
        cls, plan: Sequence[tuple[AxisBlocks, AxisBlocks, SoftmaxMean]], B: int, H: int, W: int, top: int
    ) -> "Provenance":
        """Assemble the per-pixel provenance of LS/ELS from each group's tracked state."""
        state0 = plan[0][2]
        dtype, device = state0.acc.dtype, state0.acc.device
        stats = torch.empty((B, H, W, 2), dtype=dtype, device=device)
        ids = torch.full((B, H, W, top), -1, dtype=torch.long, device=device)
        weight = torch.zeros((B, H, W, top), dtype=dtype, device=device)
        count = torch.zeros((B, H, W, top), dtype=dtype, device=device)
        for rows, cols, state in plan:
            scatter_pixels(stats, torch.stack(state.posterior_stats(), dim=-1), rows, cols)
            if top:
                w, i, c = state.top_candidates()  # [G, rows, m] each
                scatter_pixels(weight, w, rows, cols)
                scatter_pixels(ids, i, rows, cols)
                scatter_pixels(count, c, rows, cols)
        index, source = cls._decode(ids, H, W)
        return cls(index, source, weight, count.round().long(), stats[..., 0], stats[..., 1])

    @classmethod
    def from_global(cls, state: SoftmaxMean, shifts: int, H: int, W: int) -> "Provenance":
        """IS/ES: the whole-image candidates of each sample, mapped to every pixel.

        Candidate id ``image * shifts + s_row * W + s_col``: IS has ``shifts = 1`` and
        pixel p comes from p of the training image; ES has ``shifts = H * W``, the
        candidate is the image rolled by ``(s_row, s_col)``, so pixel p comes from
        ``(p - s) mod (H, W)``.
        """
        n_eff, entropy = (s[0] for s in state.posterior_stats())  # [B] each
        B = n_eff.shape[0]
        device = n_eff.device
        m = state.track
        if m:
            w, ids, c = (t[0] for t in state.top_candidates())  # [B, m] each
        else:
            w = n_eff.new_zeros(B, 0)
            ids = torch.zeros((B, 0), dtype=torch.long, device=device)
            c = w
        empty = ids < 0
        index = torch.where(empty, -1, ids // shifts)  # [B, m]
        shift = torch.where(empty, 0, ids % shifts)
        sy, sx = shift // W, shift % W  # [B, m]
        y = torch.arange(H, device=device)[None, :, None, None]  # [1, H, 1, 1]
        x = torch.arange(W, device=device)[None, None, :, None]  # [1, 1, W, 1]
        src = torch.stack(
            [((y - sy[:, None, None]) % H).expand(B, H, W, -1), ((x - sx[:, None, None]) % W).expand(B, H, W, -1)],
            dim=-1,
        )  # [B, H, W, m, 2]
        per_pixel = lambda t: t[:, None, None].expand(B, H, W, *t.shape[1:]).contiguous()  # noqa: E731
        return cls(
            per_pixel(index), src, per_pixel(w), per_pixel(c.round().long()), per_pixel(n_eff), per_pixel(entropy)
        )

    @classmethod
    def scatter(cls, parts: Sequence[tuple[torch.Tensor, "Provenance"]], batch: int) -> "Provenance":
        """Join per-class results: ``parts`` of (batch rows ``[b]``, provenance of those rows)."""
        first = parts[0][1]
        fields = {}
        for name in ("index", "source", "weight", "count", "n_eff", "entropy"):
            like = getattr(first, name)
            out = like.new_empty((batch, *like.shape[1:]))
            for rows, prov in parts:
                out[rows.to(out.device)] = getattr(prov, name)
            fields[name] = out
        return cls(**fields)


@dataclass
class ProvenanceRecorder:
    """A denoiser ``D(x, sigma)`` that records provenance along one sampler run.

    Wraps a bound machine (:meth:`patchmosaic.ScoreMachine.bind`). Every call
    records ``N_eff`` and entropy maps; the last of ``steps`` calls (the final,
    lowest-noise call, whose x0 estimate is the sample) also records the top
    ``top`` candidates per pixel.

    Attributes:
        denoiser: A :class:`~patchmosaic.denoisers.MachineDenoiser`.
        steps: Denoiser calls of the run (:func:`patchmosaic.samplers.denoiser_calls`).
        top: Candidates per pixel kept at the final call.
    """

    denoiser: object
    steps: int
    top: int = 8
    sigma: list[float] = field(default_factory=list)
    patch_sizes: list[int] = field(default_factory=list)
    n_eff: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    final: Provenance | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        if len(self.sigma) >= self.steps:
            raise ValueError(f"ProvenanceRecorder records one run of {self.steps} calls; make a new one per run")
        last = len(self.sigma) == self.steps - 1
        x0, prov = self.denoiser.with_provenance(x, sigma, top=self.top if last else 0)
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        self.sigma.append(s)
        self.patch_sizes.append(self.denoiser.patch_size_at(s) or 0)
        self.n_eff.append(prov.n_eff)
        self.entropy.append(prov.entropy)
        if last:
            self.final = prov
        return x0

    def arrays(self) -> dict[str, np.ndarray]:
        """The run's record as arrays (see :func:`save_provenance` for the fields)."""
        if self.final is None:
            raise ValueError(f"the recorder saw {len(self.sigma)} of {self.steps} calls; run the sampler first")
        f = self.final
        return {
            "index": f.index.cpu().numpy().astype(np.int64),
            "source": f.source.cpu().numpy().astype(np.int64),
            "weight": f.weight.cpu().numpy().astype(np.float32),
            "count": f.count.cpu().numpy().astype(np.int64),
            "n_eff": torch.stack(self.n_eff).cpu().numpy().astype(np.float32),  # [S, B, H, W]
            "entropy": torch.stack(self.entropy).cpu().numpy().astype(np.float32),
            "sigma": np.asarray(self.sigma, dtype=np.float64),
            "step_patch_sizes": np.asarray(self.patch_sizes, dtype=np.int64),
        }
