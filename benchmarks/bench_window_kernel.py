"""The compiled window-sum kernel against the engine, per patch size, in one run.

For each patch size k of the demo's schedule (``mnist-resnet-zeros``, 20 cosine steps) it takes the
first noise level sigma at which the schedule uses k and times one ELS call on 8 held-out digits
plus 8 seeds' noise at that sigma, against the first N bundled MNIST digits, with
``kernel="numba"`` (the window-sum kernel for the dense group) and ``kernel="torch"`` (the engine),
interleaved, best of ``--repeats``: with posterior statistics (``denoise_provenance(top=0)``, what
the demo asks at every step but the last) and without (``denoise``). Each result's largest distance
to the float64 engine is printed beside its time.

    python benchmarks/bench_window_kernel.py --threads 1
    python benchmarks/bench_window_kernel.py --threads 1 --padding circular --n-train 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from patchmosaic import ScoreMachine, noise_for_seeds  # noqa: E402
from patchmosaic.data import load_dataset  # noqa: E402
from patchmosaic.schedules import sigmas_cosine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--padding", default="zeros", choices=("zeros", "circular"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--sizes", default="", help="comma-separated patch sizes (default: every size of the schedule)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("mnist", n_train=args.n_train + args.seeds).images
    train, held_out = data[: args.n_train], data[args.n_train :]
    machines = {kern: ScoreMachine(train, kind="els", padding=args.padding, kernel=kern) for kern in ("numba", "torch")}
    exact = ScoreMachine(train.double(), kind="els", padding=args.padding, kernel="torch")
    bound = machines["torch"].bind(patch_sizes="mnist-resnet-zeros")
    sigmas = sigmas_cosine(20)
    noise = noise_for_seeds(range(args.seeds), machines["torch"].image_shape)
    points = {}
    for s in sigmas[:-1].tolist():
        points.setdefault(bound.patch_size_at(s), s)
    wanted = {int(k) for k in args.sizes.split(",") if k}
    rows = []
    for k, sigma in sorted(points.items(), reverse=True):
        if wanted and k not in wanted:
            continue
        x = held_out + sigma * noise  # held-out digits at that noise level (VE form)
        for stats in (True, False):
            want = _call(exact, x.double(), sigma, k, stats)
            best, err = {kern: float("inf") for kern in machines}, {}
            for m in machines.values():  # warm-up (the kernel compiles, or loads its cache, once)
                _call(m, x[:1], sigma, k, stats)
            for _ in range(args.repeats):
                for kern, m in machines.items():
                    start = time.perf_counter()
                    out = _call(m, x, sigma, k, stats)
                    best[kern] = min(best[kern], time.perf_counter() - start)
                    err[kern] = float((out.double() - want).abs().max())
            row = {"k": k, "sigma": round(sigma, 4), "statistics": stats, "numba_s": round(best["numba"], 3),
                   "torch_s": round(best["torch"], 3), "speedup": round(best["torch"] / best["numba"], 2),
                   "numba_err": f"{err['numba']:.1e}", "torch_err": f"{err['torch']:.1e}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nELS, padding {args.padding}, {args.seeds} seeds, N = {args.n_train}, {args.threads} thread(s); "
          "seconds per call (best of repeats), max |x - float64 engine|:")
    print("| k | sigma | statistics | window kernel | engine | speedup |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['sigma']} | {'yes' if r['statistics'] else 'no'} | {r['numba_s']} s ({r['numba_err']}) "
              f"| {r['torch_s']} s ({r['torch_err']}) | {r['speedup']}x |")


def _call(machine: ScoreMachine, x: torch.Tensor, sigma: float, k: int, stats: bool) -> torch.Tensor:
    """One ELS call's mean; with ``stats`` in the VP form that also tracks N_eff and entropy (the demo's)."""
    if not stats:
        return machine(x, sigma, patch_size=k)
    ab = 1.0 / (1.0 + sigma**2)  # x_t = sqrt(abar) x: the same posterior
    out, _ = machine.denoise_provenance(x * ab**0.5, ab, patch_size=k, top=0)
    return out


if __name__ == "__main__":
    main()
