"""Float64 brute-force references for the closed-form denoiser family, written from the formulas.

Explicit loops and difference vectors, numpy only (no library code), one query
image ``x [C, H, W]`` at a time, VE form ``x = x0 + sigma * eps``.
"""

from __future__ import annotations

import numpy as np


def softmax_mean(logits: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``sum_k softmax_k(logits) values[k]`` for ``logits [K]``, ``values [K, ...]``."""
    w = np.exp(logits - logits.max())
    return np.tensordot(w / w.sum(), values, axes=1)


def ideal(x: np.ndarray, train: np.ndarray, sigma: float) -> np.ndarray:
    """Softmax over whole images with logits ``-|x - X_k|^2 / (2 sigma^2)``."""
    logits = np.array([-((x - X) ** 2).sum() / (2 * sigma**2) for X in train])
    return softmax_mean(logits, train)


def moments(train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``mu [n]`` and ``Sigma = (1/N) sum_k (X_k - mu)(X_k - mu)^T`` ``[n, n]``."""
    X = train.reshape(len(train), -1)
    mu = X.mean(0)
    Sigma = sum(np.outer(r - mu, r - mu) for r in X) / len(X)
    return mu, Sigma


def wiener(x: np.ndarray, train: np.ndarray, sigma: float, rank: int | None = None) -> np.ndarray:
    """``mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu)``; with ``rank`` the top-r eigenpairs only."""
    mu, Sigma = moments(train)
    n = mu.size
    if rank is None:
        W = Sigma @ np.linalg.inv(Sigma + sigma**2 * np.eye(n))
    else:
        lam, U = np.linalg.eigh(Sigma)
        lam, U = lam[::-1][:rank], U[:, ::-1][:, :rank]
        W = U @ np.diag(lam / (lam + sigma**2)) @ U.T
    return (mu + W @ (x.ravel() - mu)).reshape(x.shape)


def locality_mask(train: np.ndarray, sigma: float, threshold: float) -> np.ndarray:
    """Lukoianov et al. 2509.09672 mask ``M [n, n]`` (bool) at ``sigma``."""
    _, Sigma = moments(train)
    n = Sigma.shape[0]
    W = Sigma @ np.linalg.inv(Sigma + sigma**2 * np.eye(n))
    Mt = np.empty_like(W)
    for i in range(n):
        d = W[i, i] if abs(W[i, i]) >= 1e-6 else 1.0
        for j in range(n):
            Mt[i, j] = W[i, j] / d
    return np.abs(Mt) >= threshold * np.abs(Mt).max()


def data_locality(x: np.ndarray, train: np.ndarray, sigma: float, threshold: float, temperature: float = 1.0):
    """``D(x)[j] = sum_k softmax_k(-sum_i M[i,j] (x_i - X_k,i)^2 / (2 sigma^2 T)) X_k,j``."""
    M = locality_mask(train, sigma, threshold)
    xf, X = x.ravel(), train.reshape(len(train), -1)
    out = np.empty_like(xf)
    for j in range(xf.size):
        logits = np.array([-sum((xf[i] - Xk[i]) ** 2 for i in range(xf.size) if M[i, j])
                           / (2 * sigma**2 * temperature) for Xk in X])
        out[j] = softmax_mean(logits, X[:, j])
    return out.reshape(x.shape)


def patch_composite(x: np.ndarray, train: np.ndarray, sigma: float, P: int, flips: bool = False) -> np.ndarray:
    """PSPC-Square (Niedoba et al. 2411.19339): mean over the P x P windows containing p of the window posteriors."""
    cands = np.concatenate([train, train[..., ::-1]]) if flips else train
    C, H, W = x.shape
    total, count = np.zeros_like(x), np.zeros_like(x)
    for y in range(H - P + 1):
        for z in range(W - P + 1):
            xw = x[:, y : y + P, z : z + P]
            logits = np.array([-((xw - X[:, y : y + P, z : z + P]) ** 2).sum() / (2 * sigma**2) for X in cands])
            total[:, y : y + P, z : z + P] += softmax_mean(logits, cands[:, :, y : y + P, z : z + P])
            count[:, y : y + P, z : z + P] += 1
    return total / count


def nearest_order(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """Training indices by increasing ``|x - X_k|``."""
    return np.argsort([((x - X) ** 2).sum() for X in train], kind="stable")


def topk(x: np.ndarray, train: np.ndarray, sigma: float, k: int) -> np.ndarray:
    """The ideal denoiser restricted to the k nearest training images."""
    return ideal(x, train[nearest_order(x, train)[:k]], sigma)


def knn_importance(x: np.ndarray, train: np.ndarray, sigma: float, k: int, draws: np.ndarray) -> np.ndarray:
    """Exact top-k plus a uniform-proposal importance estimate of the tail.

    ``draws [S]`` are positions in ``0..N-k-1`` into the non-neighbours sorted by index.
    """
    order = nearest_order(x, train)
    near = order[:k]
    tail = np.sort(order[k:])
    logit = np.array([-((x - X) ** 2).sum() / (2 * sigma**2) for X in train])
    c = logit[near].max()
    u = np.exp(logit - c)
    Z = u[near].sum()
    Y = np.tensordot(u[near], train[near], axes=1)
    if len(tail):
        picked = tail[draws]
        scale = len(tail) / len(draws)
        Z = Z + scale * u[picked].sum()
        Y = Y + scale * np.tensordot(u[picked], train[picked], axes=1)
    return Y / Z
