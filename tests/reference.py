"""Brute-force float64 references written straight from the machines' definitions.

Slow loops over pixels and candidates, with distances computed directly as
``|x_patch - a * train_patch|^2`` (no expansion, no engine code), for tiny inputs.
"""

from __future__ import annotations

import numpy as np


def _softmax_mean(logits: np.ndarray, values: np.ndarray) -> np.ndarray:
    w = np.exp(logits - logits.max())
    return (w[:, None] * values).sum(0) / w.sum()


def _read(img: np.ndarray, y: int, x: int, padding: str) -> np.ndarray:
    C, H, W = img.shape
    if padding == "circular":
        return img[:, y % H, x % W]
    if 0 <= y < H and 0 <= x < W:
        return img[:, y, x]
    return np.zeros(C)


def _patch(img: np.ndarray, y: int, x: int, r: int, padding: str) -> np.ndarray:
    return np.concatenate(
        [_read(img, y + dy, x + dx, padding) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    )


def _admissible(p: int, length: int, r: int, kind: str, padding: str, wrap: bool) -> list[int]:
    if kind == "ls":
        return [p]
    if padding == "circular":
        return list(range(length)) if wrap else list(range(r, length - r))
    if p < r or p > length - 1 - r:  # within r of an edge: same position on this axis
        return [p]
    return list(range(r, length - r))


def ref_patch_machine(
    x: np.ndarray, train: np.ndarray, alpha_bar: float, k: int, kind: str, padding: str, wrap: bool = True
) -> np.ndarray:
    """LS / ELS posterior mean for one query ``x [C, H, W]`` and ``train [N, C, H, W]``."""
    a, s2 = np.sqrt(alpha_bar), 1.0 - alpha_bar
    r = k // 2
    C, H, W = x.shape
    out = np.zeros_like(x)
    for py in range(H):
        for px in range(W):
            xp = _patch(x, py, px, r, padding)
            logits, values = [], []
            for img in train:
                for qy in _admissible(py, H, r, kind, padding, wrap):
                    for qx in _admissible(px, W, r, kind, padding, wrap):
                        d = xp - a * _patch(img, qy, qx, r, padding)
                        logits.append(-(d @ d) / (2 * s2))
                        values.append(img[:, qy, qx])
            out[:, py, px] = _softmax_mean(np.array(logits), np.array(values))
    return out


def ref_ideal(x: np.ndarray, train: np.ndarray, alpha_bar: float) -> np.ndarray:
    """IS posterior mean: softmax over whole training images."""
    a, s2 = np.sqrt(alpha_bar), 1.0 - alpha_bar
    logits = np.array([-((x - a * img) ** 2).sum() / (2 * s2) for img in train])
    return _softmax_mean(logits, train.reshape(len(train), -1)).reshape(x.shape)


def ref_es(x: np.ndarray, train: np.ndarray, alpha_bar: float) -> np.ndarray:
    """ES posterior mean: softmax over every training image at every circular shift."""
    a, s2 = np.sqrt(alpha_bar), 1.0 - alpha_bar
    _, H, W = x.shape
    cands = np.array(
        [np.roll(img, (sy, sx), axis=(1, 2)) for img in train for sy in range(H) for sx in range(W)]
    )
    logits = np.array([-((x - a * c) ** 2).sum() / (2 * s2) for c in cands])
    return _softmax_mean(logits, cands.reshape(len(cands), -1)).reshape(x.shape)


def ref_machine(
    x: np.ndarray,
    train: np.ndarray,
    alpha_bar: float,
    kind: str,
    padding: str,
    k: int | None = None,
    wrap: bool = True,
) -> np.ndarray:
    """Dispatch to the reference of ``kind`` for one query image."""
    if kind == "ideal":
        return ref_ideal(x, train, alpha_bar)
    if kind == "es":
        return ref_es(x, train, alpha_bar)
    return ref_patch_machine(x, train, alpha_bar, k, kind, padding, wrap)


def _candidates(x, train, py, px, kind, padding, k, wrap):
    """(id, query vector, candidate vector, constant?) for pixel p; ids as in patchmosaic.provenance."""
    _, H, W = x.shape
    if kind in ("ideal", "es"):
        shifts = [(0, 0)] if kind == "ideal" else [(sy, sx) for sy in range(H) for sx in range(W)]
        for i, img in enumerate(train):
            for sy, sx in shifts:
                cand = np.roll(img, (sy, sx), axis=(1, 2))
                yield i * len(shifts) + sy * W + sx, x.ravel(), cand.ravel(), False
        return
    r = k // 2
    xp = _patch(x, py, px, r, padding)
    for i, img in enumerate(train):
        for qy in _admissible(py, H, r, kind, padding, wrap):
            for qx in _admissible(px, W, r, kind, padding, wrap):
                cand = _patch(img, qy, qx, r, padding)
                yield (i * H + qy) * W + qx, xp, cand, bool(np.all(cand == cand[0]))


def ref_provenance(x, train, alpha_bar, kind, padding, k=None, wrap=True, nearest=False):
    """Per pixel of one query ``x [C, H, W]``: ``(entries, by_id, n_eff, entropy)``.

    ``entries`` is a list of ``(weight, id, count)`` by descending weight, where
    constant patch candidates of one value form one entry (id = lowest id,
    count = their number); ``by_id`` maps every candidate id to its entry.
    ``nearest`` uses logits ``-|x - X|^2 / 2``.
    """
    a, s2 = (1.0, 1.0) if nearest else (np.sqrt(alpha_bar), 1.0 - alpha_bar)
    _, H, W = x.shape
    out = {}
    for py in range(H):
        for px in range(W):
            ids, logits, keys = [], [], []
            for cid, q, cand, flat in _candidates(x, train, py, px, kind, padding, k, wrap):
                d = q - a * cand
                ids.append(cid)
                logits.append(-(d @ d) / (2 * s2))
                keys.append(("flat", float(cand[0])) if flat else ("id", cid))
            logits = np.array(logits)
            w = np.exp(logits - logits.max())
            w /= w.sum()
            groups = {}
            for wi, cid, key in zip(w, ids, keys):
                g = groups.setdefault(key, [0.0, cid, 0])
                g[0] += wi
                g[1] = min(g[1], cid)
                g[2] += 1
            entries = sorted((tuple(g) for g in groups.values()), key=lambda e: -e[0])
            by_id = {cid: tuple(groups[key]) for cid, key in zip(ids, keys)}
            nz = w[w > 0]
            out[py, px] = (entries, by_id, 1.0 / (w @ w), float(-(nz * np.log(nz)).sum()))
    return out
