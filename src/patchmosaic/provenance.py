"""Patch provenance: which training patches made each generated pixel.

The ELS machine's output pixel is a softmax-weighted average of training patch
centres (Kamb & Ganguli 2412.20292, Eq. 9): a "locally consistent patch
mosaic". :meth:`patchmosaic.ScoreMachine.denoise_provenance` reports, from the
same streaming pass, each pixel's top candidates (training image, patch centre
q, weight), ``N_eff = 1 / sum w^2`` and the posterior entropy;
:class:`ProvenanceRecorder` keeps them along a DDIM trajectory (top candidates
at the final step, ``N_eff`` and entropy at every step) and
:func:`save_provenance` writes them next to ``samples.npz``.

Candidate ids inside the engine are ``(image * H + q_row) * W + q_col`` for
patch machines and ``image * shifts + shift`` for IS/ES.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from patchmosaic.engine import SoftmaxMean
from patchmosaic.geometry import AxisBlocks, scatter_pixels
from patchmosaic.runs import PROVENANCE_FILE

__all__ = ["PROVENANCE_FILE", "Provenance", "ProvenanceRecorder", "load_provenance", "save_provenance",
           "split_provenance"]



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
    def from_global(cls, state: SoftmaxMean, kind: str, H: int, W: int) -> "Provenance":
        """IS/ES: the whole-image candidates of each sample, mapped to every pixel.

        IS: pixel p comes from p of the training image. ES: the candidate is the
        image rolled by ``(s_row, s_col)``, so pixel p comes from ``(p - s) mod (H, W)``.
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
        shifts = 1 if kind == "ideal" else H * W
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
    """A denoiser ``D(x_t, t)`` that records provenance along one DDIM run.

    Wraps a bound machine (:meth:`patchmosaic.ScoreMachine.bind`). Every call
    records ``N_eff`` and entropy maps; the last of ``steps`` calls (the final,
    lowest-noise step, whose x0 estimate is the sample) also records the top
    ``top`` candidates per pixel.
    """

    denoiser: object  # patchmosaic.machines.MachineDenoiser
    steps: int
    top: int = 8
    t: list[float] = field(default_factory=list)
    patch_sizes: list[int] = field(default_factory=list)
    n_eff: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    final: Provenance | None = None

    def __call__(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        if len(self.t) >= self.steps:
            raise ValueError(f"ProvenanceRecorder records one run of {self.steps} steps; make a new one per run")
        last = len(self.t) == self.steps - 1
        x0, prov = self.denoiser.with_provenance(x_t, t, top=self.top if last else 0)
        self.t.append(float(t))
        self.patch_sizes.append(self.denoiser.patch_size_at(float(t)) or 0)
        self.n_eff.append(prov.n_eff)
        self.entropy.append(prov.entropy)
        if last:
            self.final = prov
        return x0

    def arrays(self) -> dict[str, np.ndarray]:
        """The run's record as arrays (see :func:`save_provenance` for the fields)."""
        if self.final is None:
            raise ValueError(f"the recorder saw {len(self.t)} of {self.steps} steps; run the sampler first")
        f = self.final
        return {
            "index": f.index.cpu().numpy().astype(np.int64),
            "source": f.source.cpu().numpy().astype(np.int64),
            "weight": f.weight.cpu().numpy().astype(np.float32),
            "count": f.count.cpu().numpy().astype(np.int64),
            "n_eff": torch.stack(self.n_eff).cpu().numpy().astype(np.float32),  # [S, B, H, W]
            "entropy": torch.stack(self.entropy).cpu().numpy().astype(np.float32),
            "t": np.asarray(self.t, dtype=np.float64),
            "step_patch_sizes": np.asarray(self.patch_sizes, dtype=np.int64),
        }


_BATCHED = ("index", "source", "weight", "count")  # [B, ...]
_STEPPED = ("n_eff", "entropy")  # [S, B, ...]


def split_provenance(record: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One record per sample (batch size 1) of a batch record or a loaded ``provenance.npz``.

    :func:`save_provenance` of the rows, in any order, writes those samples' provenance.
    """
    n = record["index"].shape[0]
    rows = []
    for b in range(n):
        row = {name: record[name][b : b + 1] for name in _BATCHED}  # [1, ...]
        row.update({name: record[name][:, b : b + 1] for name in _STEPPED})  # [S, 1, ...]
        row["t"], row["step_patch_sizes"] = record["t"], record["step_patch_sizes"]
        rows.append(row)
    return rows


def save_provenance(path: str | Path, records: Sequence[dict[str, np.ndarray]], seeds: Sequence[int], top: int) -> None:
    """Write the provenance of a sampling run (one record per sampled batch).

    Fields of the ``.npz``: ``seeds [B]``; ``top`` m; ``patch_size`` (k of the final
    step, 0 without patches); ``index [B, H, W, m]`` (training image, -1 empty);
    ``source [B, H, W, m, 2]`` (patch centre q); ``weight [B, H, W, m]``;
    ``count [B, H, W, m]``; ``n_eff``, ``entropy [S, B, H, W]`` per step;
    ``t [S]`` and ``step_patch_sizes [S]`` (t = 1 first).
    """
    if not records:
        raise ValueError("no provenance records to save")
    out: dict[str, np.ndarray] = {
        name: np.concatenate([r[name] for r in records], axis=0) for name in _BATCHED
    }
    out.update({name: np.concatenate([r[name] for r in records], axis=1) for name in _STEPPED})
    out["t"], out["step_patch_sizes"] = records[0]["t"], records[0]["step_patch_sizes"]
    out["seeds"] = np.asarray(list(seeds), dtype=np.int64)
    out["top"] = np.asarray(top, dtype=np.int64)
    out["patch_size"] = np.asarray(int(out["step_patch_sizes"][-1]), dtype=np.int64)
    if out["index"].shape[0] != len(out["seeds"]):
        raise ValueError(f"{out['index'].shape[0]} provenance rows for {len(out['seeds'])} seeds")
    np.savez_compressed(path, **out)


def load_provenance(path: str | Path, *, n_train: int | None = None) -> dict[str, np.ndarray]:
    """Read and check a ``provenance.npz`` written by :func:`save_provenance`.

    Args:
        path: The file.
        n_train: The run's training-set size; when given, image indices must lie in
            ``-1 .. n_train - 1``.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Unreadable, a key missing, or a wrong dtype, shape or range (the message names it).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no provenance file (run 'patchmosaic sample ... --provenance' to record one)"
        )
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile.BadZipFile, OSError, ValueError, EOFError, ...: one clear error naming the file
        raise ValueError(f"{path}: not a readable provenance file ({err})") from err
    kinds = {"index": "i", "source": "i", "count": "i", "seeds": "i", "top": "i", "patch_size": "i",
             "step_patch_sizes": "i", "weight": "f", "n_eff": "f", "entropy": "f", "t": "f"}
    missing = [k for k in kinds if k not in data]
    if missing:
        raise ValueError(f"{path}: provenance file lacks {missing} (keys: {sorted(data)})")
    wrong = [f"{k} ({data[k].dtype})" for k, kind in kinds.items() if data[k].dtype.kind not in (kind, "u" if kind == "i" else kind)]
    if wrong:
        raise ValueError(f"{path}: wrong dtypes: {', '.join(wrong)}")
    if data["index"].ndim != 4:
        raise ValueError(f"{path}: index must be [B, H, W, m], got shape {data['index'].shape}")
    B, H, W, m = data["index"].shape
    S = len(data["t"])
    checks = {
        "source": (B, H, W, m, 2), "weight": (B, H, W, m), "count": (B, H, W, m), "seeds": (B,),
        "n_eff": (S, B, H, W), "entropy": (S, B, H, W), "t": (S,), "step_patch_sizes": (S,),
        "top": (), "patch_size": (),
    }
    for name, shape in checks.items():
        if data[name].shape != shape:
            raise ValueError(f"{path}: {name} has shape {data[name].shape}, expected {shape}")
    if int(data["top"]) != m or S == 0:
        raise ValueError(f"{path}: top = {int(data['top'])} with {m} entries per pixel and {S} steps")
    index = data["index"]
    high = n_train - 1 if n_train is not None else np.iinfo(np.int64).max
    if index.size and (index.min() < -1 or index.max() > high):
        raise ValueError(f"{path}: training image indices must lie in -1..{high}, "
                         f"got {int(index.min())}..{int(index.max())}")
    q = data["source"][index >= 0]  # [U, 2]
    if q.size and (q.min() < 0 or q[:, 0].max() >= H or q[:, 1].max() >= W):
        raise ValueError(f"{path}: patch centres (q_row, q_col) must lie inside the {H}x{W} images")
    return data
