"""CUDA path check of the engine (``kernel="torch"``; the fused Triton kernel has its own,
``gpu_check_fused.py``): same results as the CPU engine, and 20-step sample timings.

Run by ``benchmarks/gpu_check.sh`` on a machine with a CUDA GPU (< 5 minutes):

1. For every machine x padding x conditioning, on small random inputs, the
   CUDA result equals the CPU result (float64: 1e-10; float32: 1e-4), also
   with ``torch.set_float32_matmul_precision("medium")`` set by the caller
   (the engine pins full-precision float32 GEMMs, so TF32 cannot leak in).
2. Provenance (``denoise_provenance``, top 4) on CUDA equals the CPU's in
   float64: weights, N_eff and entropy to 1e-9, and the same source patches.
3. Times one 20-step ELS sample (zero padding, mnist-resnet-zeros schedule,
   float32) at N = 10,000 (the bundled MNIST digits) and N = 60,000 (the
   bundled digits and 5 translated copies: a synthetic stand-in for the full
   MNIST training set, which cannot be downloaded there), for 1 and 8 seeds,
   with the training set resident on the GPU.
"""

from __future__ import annotations

import itertools
import sys
import time

import torch

from patchmosaic import ScoreMachine, noise_for_seeds, sample
from patchmosaic.data import load_dataset


def check_against_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    train = torch.rand(12, 2, 9, 8, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.arange(12) % 3
    x = torch.randn(4, 2, 9, 8, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.01, 0.3, 0.9, 0.9999], dtype=torch.float64)
    cases = [("ideal", "zeros", None), ("es", "circular", None), ("ls", "zeros", 3), ("ls", "circular", 5),
             ("els", "zeros", 3), ("els", "zeros", 7), ("els", "circular", 5)]
    worst = 0.0
    for (kind, padding, k), dtype, cond, precision in itertools.product(
        cases, (torch.float64, torch.float32), (False, True), ("highest", "medium")
    ):
        label = torch.tensor([0, 1, 2, 0]) if cond else None
        cpu = ScoreMachine(train.to(dtype), kind=kind, padding=padding, labels=labels)
        gpu = ScoreMachine(train.to(dtype).cuda(), kind=kind, padding=padding, labels=labels, kernel="torch")
        torch.set_float32_matmul_precision(precision)
        try:
            want = cpu.denoise(x.to(dtype), ab.to(dtype), patch_size=k, label=label)
            got = gpu.denoise(x.to(dtype).cuda(), ab.to(dtype).cuda(), patch_size=k, label=label).cpu()
        finally:
            torch.set_float32_matmul_precision("highest")
        err = (got - want).abs().max().item()
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        status = "ok" if err <= tol else "FAIL"
        worst = max(worst, err / tol)
        print(f"{status:4s} {kind:5s} {padding:8s} k={k} {str(dtype)[6:]:7s} cond={cond!s:5s} "
              f"matmul={precision:7s} max|cuda-cpu|={err:.2e}")
        if status == "FAIL":
            raise SystemExit(f"CUDA result differs from CPU: {kind} {padding} k={k} {dtype}")
    print(f"all CUDA results match the CPU engine (worst error / tolerance = {worst:.3f})")


def check_provenance_against_cpu() -> None:
    g = torch.Generator().manual_seed(1)
    train = torch.rand(10, 1, 9, 8, generator=g, dtype=torch.float64) * 2 - 1
    train[:, :, :3] = -1.0  # a constant band: constant-patch entries
    labels = torch.arange(10) % 2
    x = torch.randn(3, 1, 9, 8, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.2, 0.7, 0.99], dtype=torch.float64)
    cases = [("ideal", "zeros", None), ("es", "circular", None), ("ls", "circular", 3), ("els", "zeros", 3),
             ("els", "circular", 5)]
    for (kind, padding, k), cond in itertools.product(cases, (False, True)):
        label = torch.tensor([0, 1, 0]) if cond else None
        cpu = ScoreMachine(train, kind=kind, padding=padding, labels=labels, chunk_elements=512)
        gpu = ScoreMachine(train.cuda(), kind=kind, padding=padding, labels=labels, chunk_elements=512)
        _, want = cpu.denoise_provenance(x, ab, patch_size=k, label=label, top=4)
        _, got = gpu.denoise_provenance(x.cuda(), ab.cuda(), patch_size=k, label=label, top=4)
        for name in ("weight", "n_eff", "entropy"):
            torch.testing.assert_close(getattr(got, name).cpu(), getattr(want, name), rtol=1e-9, atol=1e-12,
                                       msg=f"provenance {name}: {kind} {padding} k={k} cond={cond}")
        top = want.weight[..., 0] > 1.01 * want.weight[..., 1]  # [B, H, W]: an untied leading entry
        same = (got.index[..., 0].cpu() == want.index[..., 0]) & (got.source[..., 0, :].cpu() == want.source[..., 0, :]).all(-1)
        if not bool(same[top].all()):
            raise SystemExit(f"CUDA provenance picks other source patches: {kind} {padding} k={k} cond={cond}")
        print(f"ok   provenance {kind:5s} {padding:8s} k={k} cond={cond!s:5s}")
    print("CUDA provenance matches the CPU engine")


def time_samples() -> None:
    base = load_dataset("mnist").images  # [10000, 1, 32, 32]
    shifts = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)]
    sixty = torch.cat([torch.roll(base, s, dims=(2, 3)) for s in shifts])  # [60000, 1, 32, 32]
    for name, train in (("N=10000", base), ("N=60000 (synthetic)", sixty)):
        machine = ScoreMachine(train.cuda(), kind="els", padding="zeros", chunk_elements=1 << 26, kernel="torch")
        for seeds in (1, 8):
            noise = noise_for_seeds(range(seeds), (1, 32, 32)).cuda()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            sample(machine, noise, steps=20, patch_sizes="mnist-resnet-zeros")
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"{name:20s} {seeds} seed(s): {wall:7.2f} s per 20-step batch, "
                  f"{wall / seeds:6.2f} s/sample, peak GPU memory {peak:.2f} GiB", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    check_against_cpu()
    check_provenance_against_cpu()
    time_samples()


if __name__ == "__main__":
    main()
