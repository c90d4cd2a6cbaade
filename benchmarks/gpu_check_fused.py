"""Prepared one-shot GPU check of the fused Triton kernel (``patchmosaic.kernels``).

Not run yet: it needs a CUDA GPU (H100/H200) with a CUDA build of torch and
``pip install 'patchmosaic[gpu]'`` (triton). Budget: < 5 minutes.

    python benchmarks/gpu_check_fused.py                 # checks, then the timing
    python benchmarks/gpu_check_fused.py --skip-timing   # correctness only

1. Kernel vs CPU engine: :func:`fused_softmax_mean` on CUDA against the same
   partial state from :class:`SoftmaxMean` on the CPU in float64; its error
   must stay within 10x that of the float32 CPU engine (clustered random keys,
   several shapes, abar from 0.01 to 0.999, with and without counts, 1 and
   several key splits), also with ``torch.set_float32_matmul_precision
   ("medium")`` set by the caller (``input_precision="ieee"`` keeps TF32 out).
2. ELS through the kernel (``ScoreMachine(..., kernel="triton")``: the
   engine's geometry groups, one kernel call per (group, chunk of training
   images), partials merged with ``SoftmaxMean.merge``) against
   ``ScoreMachine`` on the CPU in float64, zeros and circular, k = 3, 9, 15,
   on 300 bundled MNIST digits.
3. Timing: a 20-step ELS sample (zeros, ``mnist-resnet-zeros``, float32) of 8
   seeds batched at N = 60,000 (the 10,000 bundled digits and 5 shifted copies,
   as ``gpu_check.py``), training set resident on the GPU, for the fused path
   and for the engine (``kernel="torch"``, ``chunk_elements=2**26``). Target:
   <= 1 s per sample on one H100/H200 for the fused path.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch

from patchmosaic import CosineSchedule, ScoreMachine, noise_for_seeds, sample
from patchmosaic.data import load_dataset
from patchmosaic.engine import logit_coefficients
from patchmosaic.kernels import fused_softmax_mean


def check_kernel() -> None:
    """The kernel on CUDA against SoftmaxMean on the CPU: as accurate as the engine's float32.

    Keys come in clusters of 8 near-copies (1e-3 apart) so that at abar = 0.999
    each posterior spreads over a cluster and logit errors show in the mean: a
    TF32 product (1e-3 relative error, logits off by ~10) would fail by orders
    of magnitude. (Triton's CPU interpreter ignores ``input_precision``, so
    only this check can catch TF32.)
    """
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    shapes = [(1, 5, 8, 3, 1), (2, 300, 1000, 9, 1), (3, 129, 4096, 81, 3), (1, 64, 20000, 225, 1), (1, 9, 320, 50, 70)]
    for (G, Bq, M, D, V), abar, with_counts, splits, precision in itertools.product(
        shapes, (0.01, 0.5, 0.999), (False, True), (1, None), ("highest", "medium")
    ):
        base = torch.rand(G, M // 8, D, generator=g) * 2 - 1
        keys = base.repeat_interleave(8, dim=1) + 1e-3 * torch.randn(G, M, D, generator=g)  # [G, M, D]
        values = torch.rand(G, M, V, generator=g) * 2 - 1
        pick = keys[:, torch.randint(0, M, (Bq,), generator=g)]  # [G, Bq, D]
        queries = abar**0.5 * pick + (1 - abar) ** 0.5 * torch.randn(G, Bq, D, generator=g)
        scale, bias = logit_coefficients(torch.full((Bq,), abar))
        counts = torch.randint(0, 4, (G, M), generator=g).float() if with_counts else None
        args = (queries, scale, bias, keys, keys.square().sum(-1), values)
        want_ref, want_acc = fused_softmax_mean(*(t.double() for t in args), backend="torch",
                                                counts=None if counts is None else counts.double())
        eng_ref, eng_acc = fused_softmax_mean(*args, counts=counts, backend="torch")  # float32 engine, CPU
        torch.set_float32_matmul_precision(precision)
        try:
            ref, acc = fused_softmax_mean(*(t.cuda() for t in args), counts=None if counts is None else counts.cuda(),
                                          backend="triton", splits=splits)
        finally:
            torch.set_float32_matmul_precision("highest")
        err = (acc.cpu().double() - want_acc).abs().max().item()
        eng = (eng_acc.double() - want_acc).abs().max().item()
        err_ref = (ref.cpu().double() - want_ref).abs().max().item()
        eng_ref_err = (eng_ref.double() - want_ref).abs().max().item()
        tol = 10 * eng + 1e-5  # TF32 would be ~1000x the engine
        ok = err <= tol and err_ref <= 10 * eng_ref_err + 1e-5 * want_ref.abs().max().item()
        worst = max(worst, err / tol)
        print(f"{'ok' if ok else 'FAIL':4s} kernel G={G} Bq={Bq} M={M} D={D} V={V} abar={abar} "
              f"counts={with_counts!s:5s} splits={splits} matmul={precision:7s} max|mean err|={err:.1e} "
              f"(engine float32 {eng:.1e}) max|ref err|={err_ref:.1e} (engine {eng_ref_err:.1e})")
        if not ok:
            raise SystemExit("the fused kernel on CUDA is less accurate than the float32 CPU engine")
    print(f"kernel matches the CPU engine (worst error / tolerance = {worst:.3f})")


def check_els() -> None:
    """ScoreMachine(kernel="triton") on CUDA against ScoreMachine on the CPU (float64), 300 MNIST digits."""
    data = load_dataset("mnist", n_train=304).images
    train, x0 = data[:300], data[300:]
    for padding, (t, k) in itertools.product(("zeros", "circular"), ((0.1, 3), (0.5, 9), (0.9, 15))):
        ab = float(CosineSchedule().alpha_bar(t))
        x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise_for_seeds(range(4), x0.shape[1:])
        want = ScoreMachine(train.double(), kind="els", padding=padding).denoise(x_t.double(), ab, patch_size=k)
        torch.cuda.synchronize()
        start = time.perf_counter()
        fused = ScoreMachine(train.cuda(), kind="els", padding=padding, kernel="triton", chunk_elements=1 << 26)
        got = fused.denoise(x_t.cuda(), ab, patch_size=k)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        err = (got.cpu().double() - want).abs().max().item()
        status = "ok" if err <= 1e-3 else "FAIL"
        print(f"{status:4s} fused ELS {padding:8s} t={t} k={k:2d} max|cuda-cpu|={err:.1e} ({wall:.3f} s, first call)")
        if status == "FAIL":
            raise SystemExit("fused ELS differs from ScoreMachine")


def time_sample(engine_too: bool) -> None:
    """20-step ELS sample, 8 seeds batched, N = 60,000 (synthetic), fused path (and the engine)."""
    base = load_dataset("mnist").images  # [10000, 1, 32, 32]
    shifts = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)]
    sixty = torch.cat([torch.roll(base, s, dims=(2, 3)) for s in shifts]).cuda()  # [60000, 1, 32, 32]
    noise = noise_for_seeds(range(8), (1, 32, 32)).cuda()
    runs = [("fused", "triton")] + ([("engine", "torch")] if engine_too else [])
    results = {}
    for name, kernel in runs:
        denoiser = ScoreMachine(sixty, kind="els", padding="zeros", kernel=kernel, chunk_elements=1 << 26)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = sample(denoiser, noise, steps=20, patch_sizes="mnist-resnet-zeros")
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        assert bool(torch.isfinite(out).all())
        results[name] = out.cpu()
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{name:6s} N=60000 (synthetic) 8 seeds: {wall:7.2f} s per 20-step batch, {wall / 8:6.2f} s/sample "
              f"(target <= 1 s), peak GPU memory {peak:.2f} GiB", flush=True)
    if len(results) == 2:
        print(f"max |fused - engine| over the 8 samples: {(results['fused'] - results['engine']).abs().max():.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-timing", action="store_true", help="run the correctness checks only")
    parser.add_argument("--no-engine", action="store_true", help="time the fused path only (not ScoreMachine)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU (on CPU, tests/test_fused_kernel.py runs the interpreter)")
    import triton

    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    check_kernel()
    check_els()
    if not args.skip_timing:
        time_sample(engine_too=not args.no_engine)


if __name__ == "__main__":
    main()
