"""Nearest-neighbour denoisers: the ideal denoiser restricted to, or estimated from, the nearest training images.

* :class:`TopK`: softmax over the k training images nearest to x (in L2) with the
  ideal logits ``-|x - X_k|^2 / (2 sigma^2)``; exact when k = N, and close to
  the ideal denoiser whenever the other images carry negligible posterior weight.
* :class:`KNNImportance` (Niedoba et al., arXiv 2402.08018): the k nearest
  neighbours exactly plus a self-normalised importance-sampling estimate of the
  rest of the training set (see the class docstring for the estimator).
* :class:`Nearest`: the training image nearest to x (the sigma -> 0 limit).

Search is exact (brute force): ``faiss.IndexFlatL2`` when ``faiss`` (the optional
``faiss-cpu`` package) imports, else a torch fallback computing
``|X|^2 - 2 <x, X>`` in x's dtype; both return the same neighbour sets up to
exact distance ties (tested). faiss searches in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from patchmosaic.denoisers.base import (
    TrainingSet,
    TrainingSetDenoiser,
    call_generator,
    check_positive_int,
    check_seed,
)

__all__ = ["BACKENDS", "KNNImportance", "Nearest", "NeighbourSearch", "TopK", "faiss_available"]

BACKENDS = ("auto", "faiss", "torch")


def _import_faiss() -> object | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_available() -> bool:
    """Whether the optional ``faiss`` module imports."""
    return _import_faiss() is not None


class NeighbourSearch:
    """Exact L2 k-nearest-neighbour search over a training set, per class.

    Args:
        train: The training set.
        backend: ``"auto"`` (faiss if it imports, else torch), ``"faiss"`` or ``"torch"``.
    """

    def __init__(self, train: TrainingSet, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; expected one of {BACKENDS}")
        faiss = _import_faiss()
        if backend == "faiss" and faiss is None:
            raise ImportError("backend='faiss' needs the optional faiss-cpu package: pip install faiss-cpu")
        self.backend = "torch" if backend == "torch" or faiss is None else "faiss"
        self.train = train
        self._faiss = faiss
        self._indexes: dict[int | None, object] = {}
        self._norms: dict[tuple[int | None, torch.dtype, torch.device], torch.Tensor] = {}

    def search(self, x: torch.Tensor, k: int, cls: int | None) -> torch.Tensor:
        """Indices (into class ``cls``'s images) of the ``k`` nearest, nearest first: ``[B, k]`` long."""
        B = x.shape[0]
        if self.backend == "faiss":
            if cls not in self._indexes:
                X = self.train.images_of(cls).reshape(self.train.class_size(cls), -1)  # [N_c, n]
                index = self._faiss.IndexFlatL2(X.shape[1])
                index.add(np.ascontiguousarray(X.numpy(), dtype=np.float32))
                self._indexes[cls] = index
            q = np.ascontiguousarray(x.detach().reshape(B, -1).cpu().numpy(), dtype=np.float32)  # [B, n]
            _, idx = self._indexes[cls].search(q, k)
            return torch.from_numpy(idx).to(device=x.device, dtype=torch.long)  # [B, k]
        X = self.train.subset(x, cls).reshape(-1, x[0].numel())  # [N_c, n]
        key = (cls, x.dtype, x.device)
        if key not in self._norms:
            self._norms[key] = X.square().sum(1)  # [N_c]
        d = self._norms[key] - 2.0 * x.reshape(B, -1) @ X.T  # [B, N_c], |x - X|^2 - |x|^2
        return d.topk(k, dim=1, largest=False, sorted=True).indices  # [B, k]


class _NeighbourDenoiser(TrainingSetDenoiser):
    """Training set, search and parameter checks shared by the three classes."""

    def __init__(self, train, labels, backend: str, k: int) -> None:
        self.train = TrainingSet(train, labels)
        self.search = NeighbourSearch(self.train, backend)
        self.k = check_positive_int(k, "k", maximum=self.train.num, what_max=" (N, the training images)")

    def _denoise_class(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None, *draws: torch.Tensor) -> torch.Tensor:
        if self.k > self.train.class_size(cls):
            raise ValueError(f"k = {self.k} exceeds the {self.train.class_size(cls)} training images of class {cls}")
        return self._denoise(x, sigma, cls, *draws)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None, *draws: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _logits(x: torch.Tensor, cand: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``-|x_b - cand[b, m]|^2 / (2 sigma_b^2)`` for ``x [B, C, H, W]``, ``cand [B, M, C, H, W]``: ``[B, M]``."""
    return -(x[:, None] - cand).square().flatten(2).sum(-1) / (2.0 * sigma[:, None].square())


class TopK(_NeighbourDenoiser):
    """The ideal denoiser restricted to the k nearest training images of x.

    ``D(x) = sum_{m in kNN(x)} softmax_m(-|x - X_m|^2 / (2 sigma^2)) X_m``, the
    neighbours found by exact L2 search (faiss or torch, module docstring) and
    the logits computed from the differences in x's dtype. Exact for k = N; the
    error against the ideal denoiser is the posterior mass outside the k
    nearest (measured with ``patchmosaic probe``, README).

    Cost per call: the search, ``2 B N n`` flops, plus ``3 B k n``.

    Args:
        train: ``[N, C, H, W]`` training images.
        k: Neighbours, 1 <= k <= N.
        labels: Optional ``[N]`` integer labels for ``label=`` conditioning.
        backend: Search backend, ``"auto"``, ``"faiss"`` or ``"torch"``.
    """

    def __init__(
        self,
        train: torch.Tensor | np.ndarray,
        *,
        k: int,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(train, labels, backend, k)

    def __repr__(self) -> str:
        return f"TopK(N={self.train.num}, k={self.k}, search={self.search.backend})"

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None) -> torch.Tensor:
        images = self.train.subset(x, cls)  # [N_c, C, H, W]
        cand = images[self.search.search(x, self.k, cls)]  # [B, k, C, H, W]
        w = torch.softmax(_logits(x, cand, sigma), dim=1)  # [B, k]
        return torch.einsum("bm,bmchw->bchw", w, cand)  # [B, C, H, W]


class KNNImportance(_NeighbourDenoiser):
    """Exact top-k neighbours plus an importance-sampled tail (Niedoba et al., arXiv 2402.08018).

    With logits ``l_i = -|x - X_i|^2 / (2 sigma^2)``, ``c = max_i l_i`` (the
    nearest neighbour's) and unnormalised weights ``u_i = exp(l_i - c)``, the
    ideal denoiser is ``(sum_i u_i X_i) / (sum_i u_i)``. Split the N images into
    the k nearest ``K`` and the tail ``T`` (N - k images). Every tail weight is
    at most the smallest neighbour weight ``u_min = min_{i in K} u_i``, so the
    constant ``u_min`` on T is an upper-bound proposal; it is uniform over T.
    With ``S = samples`` draws ``j_1..j_S`` uniform over T (with replacement):

        Z_K = sum_{i in K} u_i,           Y_K = sum_{i in K} u_i X_i            (exact)
        Z_T ~ (N - k)/S sum_s u_{j_s},    Y_T ~ (N - k)/S sum_s u_{j_s} X_{j_s}  (importance sampled)
        D(x) = (Y_K + Y_T) / (Z_K + Z_T)

    ``Y_T / Z_T`` is the self-normalised importance estimate of the tail's
    posterior mean (importance weights ``u_j / u_min``, proposal uniform) and
    ``Z_T`` the unbiased estimate of the tail's normaliser; the exact neighbour
    part replaces the sampling of the k heaviest terms of the paper's proposal.
    Exact for k = N (empty tail); its error shrinks as ``O(1/sqrt(S))``.

    Draws: call number ``c`` (0, 1, ... since construction or :meth:`reset`)
    takes ``U = torch.rand((B, S), generator=call_generator(seed, c),
    dtype=torch.float64)``; row b picks positions ``floor(U * (N_b - k))`` into
    its tail sorted by training index (``N_b`` the size of its class's set).

    Cost per call: the search, ``2 B N n`` flops, plus ``3 B (k + S) n``.

    Args:
        train: ``[N, C, H, W]`` training images.
        k: Exact neighbours, 1 <= k <= N.
        samples: Tail draws S >= 1.
        seed: Seed of the per-call generators.
        labels: Optional ``[N]`` integer labels for ``label=`` conditioning.
        backend: Search backend, ``"auto"``, ``"faiss"`` or ``"torch"``.
    """

    def __init__(
        self,
        train: torch.Tensor | np.ndarray,
        *,
        k: int,
        samples: int,
        seed: int = 0,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(train, labels, backend, k)
        self.samples = check_positive_int(samples, "samples")
        self.seed = check_seed(seed)
        self.calls = 0

    def __repr__(self) -> str:
        return f"KNNImportance(N={self.train.num}, k={self.k}, samples={self.samples}, seed={self.seed})"

    def reset(self, call: int = 0) -> None:
        """Set the index of the next call."""
        self.calls = int(call)

    def _draw(self, batch: int) -> tuple[torch.Tensor, ...]:
        """``U [B, S]`` uniform in [0, 1) from this call's generator (class docstring)."""
        U = torch.rand((batch, self.samples), generator=call_generator(self.seed, self.calls), dtype=torch.float64)
        self.calls += 1
        return (U,)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None, U: torch.Tensor) -> torch.Tensor:
        images = self.train.subset(x, cls)  # [N_c, C, H, W]
        B, Nc = x.shape[0], images.shape[0]
        near = self.search.search(x, self.k, cls)  # [B, k]
        cand = images[near]  # [B, k, C, H, W]
        l_near = _logits(x, cand, sigma)  # [B, k]
        c = l_near.amax(1, keepdim=True)  # [B, 1]
        u_near = torch.exp(l_near - c)  # [B, k]
        Z = u_near.sum(1)  # [B]
        Y = torch.einsum("bm,bmchw->bchw", u_near, cand)  # [B, C, H, W]
        tail = Nc - self.k
        if tail > 0:
            is_near = torch.zeros((B, Nc), dtype=torch.int8, device=x.device)
            is_near.scatter_(1, near, 1)
            order = torch.argsort(is_near, dim=1, stable=True)[:, :tail]  # [B, N_c - k], tail by index
            pos = (U * tail).long().clamp_(max=tail - 1).to(x.device)  # [B, S]
            picked = order.gather(1, pos)  # [B, S]
            tcand = images[picked]  # [B, S, C, H, W]
            u_tail = torch.exp(_logits(x, tcand, sigma) - c)  # [B, S]
            scale = tail / self.samples
            Z = Z + scale * u_tail.sum(1)
            Y = Y + scale * torch.einsum("bs,bschw->bchw", u_tail, tcand)
        return Y / Z[:, None, None, None]  # [B, C, H, W]


class Nearest(_NeighbourDenoiser):
    """The training image nearest to x in L2 (independent of sigma; the sigma -> 0 limit of the ideal denoiser).

    Args:
        train: ``[N, C, H, W]`` training images.
        labels: Optional ``[N]`` integer labels for ``label=`` conditioning.
        backend: Search backend, ``"auto"``, ``"faiss"`` or ``"torch"``.
    """

    def __init__(
        self,
        train: torch.Tensor | np.ndarray,
        *,
        labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(train, labels, backend, 1)

    def __repr__(self) -> str:
        return f"Nearest(N={self.train.num}, search={self.search.backend})"

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, cls: int | None) -> torch.Tensor:
        return self.train.subset(x, cls)[self.search.search(x, 1, cls)[:, 0]]  # [B, C, H, W]
