"""Why exact data locality blurs at low noise on MNIST: the global max of |Mt| and what the threshold keeps.

    python benchmarks/data_locality_mask.py --n-train 1000 --threshold 0.005 --sigmas 0.3,0.157,0.0781
    python benchmarks/data_locality_mask.py --size 32 --threshold 0.002,0.005,0.02 --sigmas 0.0781

For each threshold and sigma: max |Mt| = max |W[i, j] / W[i, i]| and the W[i, i] of its row, the
fraction of pixels whose own entry (Mt[i, i] = 1) survives the mask, the median number of
input pixels an output pixel sees, the fraction of outputs that see no input at all (their softmax is uniform: the
training mean), and the largest difference between DataLocality in float32 and
float64 on 8 noised training digits (so the blur is the formula, not rounding).
Uses the same GaussianMoments and mask rule as DataLocality.
"""

from __future__ import annotations

import argparse

import torch

from patchmosaic.data import load_dataset
from patchmosaic.denoisers import DataLocality
from patchmosaic.denoisers.data_locality import DIAGONAL_FLOOR, locality_mask
from patchmosaic.denoisers.wiener import GaussianMoments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE (default: stored size)")
    parser.add_argument("--threshold", default="0.005", help="one threshold or a comma-separated list")
    parser.add_argument("--sigmas", default="0.3,0.157,0.0781")
    args = parser.parse_args()
    images = load_dataset(args.dataset, n_train=args.n_train, size=args.size).images
    moments = GaussianMoments.fit(images)
    for threshold in (float(t) for t in args.threshold.split(",")):
        print(f"threshold {threshold:g}")
        report(images, moments, threshold, [float(s) for s in args.sigmas.split(",")])


def report(images: torch.Tensor, moments: GaussianMoments, threshold: float, sigmas: list[float]) -> None:
    d32 = DataLocality(images, threshold=threshold)
    d64 = DataLocality(images.double(), threshold=threshold)
    g = torch.Generator().manual_seed(0)
    for sigma in sigmas:
        W = moments.W(sigma)  # [n, n] float64
        d = W.diagonal()
        Mt = (W / d.where(d.abs() >= DIAGONAL_FLOOR, d.new_ones(()))[:, None]).abs()
        i = int(Mt.argmax()) // Mt.shape[1]
        M = locality_mask(moments, sigma, threshold)
        x = images[:8] + sigma * torch.randn(images[:8].shape, generator=g)  # [8, C, H, W] noised digits
        print(f"sigma {sigma:g}: max|Mt| {float(Mt.max()):.3g} (row {i}, W[i,i] = {float(d[i]):.3g}); "
              f"own pixel kept at {float(M.diagonal().float().mean()):.1%} of pixels; "
              f"median inputs per output {float(M.sum(0).float().median()):.0f}; "
              f"outputs seeing no input {float((~M.any(0)).float().mean()):.1%}; "
              f"float32 vs float64 {float((d32(x, sigma).double() - d64(x.double(), sigma)).abs().max()):.2g}")


if __name__ == "__main__":
    main()
