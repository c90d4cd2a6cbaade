"""One-shot GPU check and timing of the fused Triton kernel (``patchmosaic.kernels``).

Needs a CUDA GPU with a CUDA build of torch and triton (``pip install
'patchmosaic[gpu]'``). Budget: about 7 minutes on one H200 (402 s on 2026-11-30:
docs/gpu/2026-11-30-h200-run2.log).

    python benchmarks/gpu_check_fused.py --out DIR       # checks, tiles, timings; DIR/gpu_check_fused.json
    python benchmarks/gpu_check_fused.py --skip-timing   # correctness only
    python benchmarks/gpu_check_fused.py --stages tiles,sample   # some stages (kernel,tiles,els,sample,profile)

1. Kernel vs CPU engine, for each precision (``ieee`` float32 products and
   ``tf32x3`` split-precision tensor-core products): :func:`fused_softmax_mean`
   on CUDA against the same partial state computed in float64 on the CPU; its
   error must stay within 10x that of the float32 CPU engine (clustered random
   keys, several shapes, abar from 0.01 to 0.999, with and without counts, 1
   and several key splits), also with ``torch.set_float32_matmul_precision
   ("medium")`` set by the caller (the kernel names its precision, so TF32
   alone cannot leak in). The worst error of each precision is reported.
2. Tiles: each precision's candidate launch configurations (query rows x keys
   x feature step, warps, stages) timed on one chunk of MNIST-sized ELS
   problems (interior queries of 8 samples against 131,072 training patches at
   k = 15, 11, 5 and 3), and the key layout (rows of ``D + 2`` floats as the
   engine copies them, or rounded up to 16 for aligned loads) with the default
   tiles, and ``hoist_queries`` off and on at k = 3, 5 and 7. The fastest
   configuration over the four sizes becomes the precision's tiles for the rest
   of the run (``TILES`` in the module holds the defaults a run chose).
3. ELS through the kernel (``ScoreMachine(..., kernel="triton")``) against
   ``ScoreMachine`` on the CPU in float64, zeros and circular, k = 3, 9, 15,
   on 300 bundled MNIST digits, for each precision.
4. Timing: a 20-step ELS sample (zeros, ``mnist-resnet-zeros``, float32) of 8
   seeds batched at N = 60,000 (the 10,000 bundled digits and 5 shifted copies:
   the full MNIST training set cannot be downloaded there), training set
   resident on the GPU, for the fused path in each precision and for the
   engine (``kernel="torch"``, ``chunk_elements=2**26``), with the largest
   difference between their samples. Target: <= 1 s per sample. The tf32x3
   path is timed twice: first with Triton's compilation of its kernels, then warm.
5. Profile: where one warm fused tf32x3 call spends its GPU time at k = 15 and
   k = 3 (``torch.profiler``, N = 60,000, 8 seeds).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from patchmosaic import CosineSchedule, ScoreMachine, noise_for_seeds, sample
from patchmosaic.data import load_dataset
from patchmosaic.engine import logit_coefficients
from patchmosaic.kernels.fused_softmax import (
    PRECISIONS,
    TILES,
    Tiles,
    fused_softmax_mean,
)

# Candidate launch configurations per precision (block_q, block_m, block_d, num_warps, num_stages).
CANDIDATES = {
    "ieee": [Tiles(128, 128, 32, 8, 2), Tiles(128, 128, 16, 8, 2), Tiles(128, 64, 32, 8, 2), Tiles(64, 64, 32, 4, 2),
             Tiles(128, 128, 32, 8, 3)],
    "tf32x3": [Tiles(128, 128, 32, 8, 3), Tiles(128, 128, 32, 8, 2), Tiles(128, 128, 16, 8, 3), Tiles(128, 64, 32, 8, 3),
               Tiles(64, 64, 32, 4, 3), Tiles(128, 128, 64, 8, 2)],
}


STAGES = ("kernel", "tiles", "els", "sample", "profile")
# (groups, queries, keys, features, values) of the kernel check's random problems.
KERNEL_SHAPES = [(1, 5, 8, 3, 1), (2, 300, 1000, 9, 1), (3, 129, 4096, 81, 3), (1, 64, 20000, 225, 1), (1, 9, 320, 50, 70)]


def check_kernel(results: dict) -> None:
    """The kernel on CUDA against float64 on the CPU: as accurate as the engine's float32.

    Keys come in clusters of 8 near-copies (1e-3 apart) so that at abar = 0.999
    each posterior spreads over a cluster and logit errors show in the mean: a
    TF32 product (1e-3 relative error, logits off by ~10) would fail by orders
    of magnitude. (Triton's CPU interpreter ignores ``input_precision``, so
    only this check can catch the product's precision.)
    """
    g = torch.Generator().manual_seed(0)
    worst = {p: 0.0 for p in PRECISIONS}
    worst_err = {p: 0.0 for p in PRECISIONS}
    failures = []
    shapes = KERNEL_SHAPES
    for (G, Bq, M, D, V), abar, with_counts in itertools.product(shapes, (0.01, 0.5, 0.999), (False, True)):
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
        eng = (eng_acc.double() - want_acc).abs().max().item()
        eng_ref_err = (eng_ref.double() - want_ref).abs().max().item()
        for precision, splits, matmul in itertools.product(PRECISIONS, (1, None), ("highest", "medium")):
            torch.set_float32_matmul_precision(matmul)
            try:
                ref, acc = fused_softmax_mean(*(t.cuda() for t in args), counts=None if counts is None else counts.cuda(),
                                              backend="triton", precision=precision, splits=splits)
            finally:
                torch.set_float32_matmul_precision("highest")
            err = (acc.cpu().double() - want_acc).abs().max().item()
            err_ref = (ref.cpu().double() - want_ref).abs().max().item()
            tol = 10 * eng + 1e-5  # TF32 alone would be ~1000x the engine
            ok = err <= tol and err_ref <= 10 * eng_ref_err + 1e-5 * want_ref.abs().max().item()
            worst[precision] = max(worst[precision], err / tol)
            worst_err[precision] = max(worst_err[precision], err)
            if not ok:
                failures.append(precision)
                print(f"FAIL kernel {precision} G={G} Bq={Bq} M={M} D={D} V={V} abar={abar} counts={with_counts} "
                      f"splits={splits} matmul={matmul}: max|mean err|={err:.1e} (engine float32 {eng:.1e}) "
                      f"max|ref err|={err_ref:.1e} (engine {eng_ref_err:.1e})")
    for precision in PRECISIONS:
        status = "FAILS" if precision in failures else "matches"
        print(f"kernel {precision:6s} {status} float64 within 10x the float32 CPU engine's error: worst error / "
              f"tolerance = {worst[precision]:.3f}, largest |mean error| = {worst_err[precision]:.1e} "
              f"({len(shapes) * 6 * 4} cases)", flush=True)
    results["kernel"] = {p: {"ok": p not in failures, "worst_over_tolerance": worst[p], "max_mean_error": worst_err[p]}
                         for p in PRECISIONS}


def tile_problem(D: int, M: int = 131072, aligned: bool = True, seed: int = 0):
    """Interior ELS queries of 8 MNIST samples (``(32 - 2r)^2`` each) against M training patches."""
    k = round(D**0.5)
    Bq = 8 * (32 - (k - 1)) ** 2
    g = torch.Generator(device="cuda").manual_seed(seed)
    width = -(-(D + 2) // 16) * 16 if aligned else D + 2
    rows = torch.rand(1, M, width, generator=g, device="cuda")  # keys stored as the engine copies them
    keys = rows[:, :, :D]
    queries = torch.rand(1, Bq, D, generator=g, device="cuda") * 0.9
    scale, bias = logit_coefficients(torch.full((Bq,), 0.5, device="cuda"))
    values = torch.rand(1, M, 1, generator=g, device="cuda")
    return queries, scale, bias, keys, keys.square().sum(-1), values


def time_tiles(results: dict) -> None:
    """Time each precision's candidate tiles and the key layout; install the fastest tiles."""
    import triton.testing

    sizes = (225, 121, 25, 9)
    problems = {D: tile_problem(D) for D in sizes}
    flops = {D: 2 * problems[D][0].shape[1] * problems[D][3].shape[1] * D for D in sizes}
    out = {}
    for precision in PRECISIONS:
        rows = []
        for tiles in CANDIDATES[precision]:
            times = {}
            try:
                for D in sizes:
                    fn = functools.partial(fused_softmax_mean, *problems[D], backend="triton", precision=precision,
                                           **tiles._asdict())
                    times[D] = triton.testing.do_bench(fn, warmup=5, rep=40)
            except Exception as error:  # noqa: BLE001 (a configuration that does not compile, e.g. shared memory, is reported and skipped)
                print(f"tiles {precision} {tuple(tiles)}: failed ({type(error).__name__}: {str(error)[:120]})")
                continue
            total = sum(times.values())
            rows.append((total, tiles, times))
            print(f"tiles {precision:6s} {tuple(tiles)!s:24s} " + "  ".join(
                f"k={round(D**0.5):2d} {times[D]:7.2f} ms {flops[D] / times[D] / 1e9:5.1f} TFLOP/s" for D in sizes),
                flush=True)
        if not rows:
            raise SystemExit(f"no tile configuration of precision {precision} ran")
        total, best, times = min(rows, key=lambda r: r[0])
        TILES[precision] = best
        print(f"tiles {precision}: fastest {tuple(best)} ({total:.2f} ms over the four sizes)", flush=True)
        layout = {}
        for aligned in (False, True):
            prob = tile_problem(225, aligned=aligned)
            fn = functools.partial(fused_softmax_mean, *prob, backend="triton", precision=precision)
            layout["aligned 16" if aligned else "rows of D + 2"] = triton.testing.do_bench(fn, warmup=5, rep=40)
        print(f"layout {precision}: k=15 " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in layout.items()), flush=True)
        hoist = {}
        for D in (9, 25, 49):  # query tiles loaded once (hoist_queries) or once per key tile
            prob = tile_problem(D)
            for hoisted in (False, True):
                fn = functools.partial(fused_softmax_mean, *prob, backend="triton", precision=precision,
                                       hoist_queries=hoisted)
                hoist[f"k={round(D**0.5)} {'hoisted' if hoisted else 'stepped'}"] = triton.testing.do_bench(
                    fn, warmup=5, rep=40)
        print(f"hoist {precision}: " + ", ".join(f"{name} {ms:.2f} ms" for name, ms in hoist.items()), flush=True)
        out[precision] = {"best": list(best), "layout_ms_k15": layout, "hoist_ms": hoist,
                          "candidates": [{"tiles": list(t), "ms": {str(D): v for D, v in tm.items()}} for _, t, tm in rows],
                          "tflops_best": {str(D): flops[D] / times[D] / 1e9 for D in sizes}}
    results["tiles"] = out


def check_els(results: dict, n_train: int = 300) -> None:
    """ScoreMachine(kernel="triton") on CUDA against ScoreMachine on the CPU (float64), 300 MNIST digits."""
    data = load_dataset("mnist", n_train=n_train + 4).images
    train, x0 = data[:n_train], data[n_train:]
    worst = {p: 0.0 for p in PRECISIONS}
    for padding, (t, k) in itertools.product(("zeros", "circular"), ((0.1, 3), (0.5, 9), (0.9, 15))):
        ab = float(CosineSchedule().alpha_bar(t))
        x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * noise_for_seeds(range(4), x0.shape[1:])
        want = ScoreMachine(train.double(), kind="els", padding=padding).denoise(x_t.double(), ab, patch_size=k)
        for precision in PRECISIONS:
            fused = ScoreMachine(train.cuda(), kind="els", padding=padding, kernel="triton",
                                 kernel_precision=precision, chunk_elements=1 << 26)
            got = fused.denoise(x_t.cuda(), ab, patch_size=k)
            err = (got.cpu().double() - want).abs().max().item()
            worst[precision] = max(worst[precision], err)
            print(f"{'ok' if err <= 1e-3 else 'FAIL':4s} fused ELS {precision:6s} {padding:8s} t={t} k={k:2d} "
                  f"max|cuda-cpu float64|={err:.1e}", flush=True)
    results["els"] = {p: {"max_error_vs_float64": worst[p], "ok": worst[p] <= 1e-3} for p in PRECISIONS}


def sixty_thousand() -> tuple[torch.Tensor, torch.Tensor]:
    """N = 60,000 training images on the GPU (the 10,000 bundled digits and 5 shifted copies) and 8 seeds' noise."""
    base = load_dataset("mnist").images  # [10000, 1, 32, 32]
    shifts = [(0, 0), (1, 0), (0, 1), (-1, 0), (0, -1), (1, 1)]
    sixty = torch.cat([torch.roll(base, s, dims=(2, 3)) for s in shifts]).cuda()  # [60000, 1, 32, 32]
    return sixty, noise_for_seeds(range(8), (1, 32, 32)).cuda()


def time_sample(results: dict, engine_too: bool) -> None:
    """20-step ELS sample, 8 seeds batched, N = 60,000 (synthetic), fused path (and the engine)."""
    sixty, noise = sixty_thousand()
    first = f"fused {PRECISIONS[-1]}"  # tf32x3: timed twice, with and without Triton's compilation
    runs = [(f"{first} (cold)", {"kernel": "triton", "kernel_precision": PRECISIONS[-1]}),
            (first, {"kernel": "triton", "kernel_precision": PRECISIONS[-1]})]
    runs += [("engine", {"kernel": "torch"})] if engine_too else []
    runs += [(f"fused {p}", {"kernel": "triton", "kernel_precision": p}) for p in PRECISIONS[:-1]]
    samples, out = {}, {}
    for name, options in runs:
        denoiser = ScoreMachine(sixty, kind="els", padding="zeros", chunk_elements=1 << 26, **options)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        got = sample(denoiser, noise, steps=20, patch_sizes="mnist-resnet-zeros")
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
        assert bool(torch.isfinite(got).all())
        samples[name] = got.cpu()
        peak = torch.cuda.max_memory_allocated() / 2**30
        out[name] = {"batch_s": wall, "per_sample_s": wall / 8, "peak_gib": peak}
        print(f"{name:19s} N=60000 (synthetic) 8 seeds: {wall:7.2f} s per 20-step batch, {wall / 8:6.3f} s/sample "
              f"(target <= 1 s), peak GPU memory {peak:.2f} GiB", flush=True)
    names = [n for n in samples if not n.endswith("(cold)")]
    for a, b in itertools.combinations(names, 2):
        diff = (samples[a] - samples[b]).abs().max().item()
        out[f"max|{a} - {b}|"] = diff
        print(f"max |{a} - {b}| over the 8 samples: {diff:.1e}")
    if "engine" in out:
        for name in out:
            if name.startswith("fused"):
                print(f"{name}: {out['engine']['batch_s'] / out[name]['batch_s']:.2f}x the engine")
    results["sample"] = out


def profile_calls(results: dict) -> None:
    """Where one fused tf32x3 call spends its GPU time at k = 15 and k = 3 (torch.profiler, N = 60,000)."""
    from torch.profiler import ProfilerActivity, profile

    sixty, noise = sixty_thousand()
    denoiser = ScoreMachine(sixty, kind="els", padding="zeros", kernel="triton", kernel_precision=PRECISIONS[-1],
                            chunk_elements=1 << 26)
    out = {}
    for t, k in ((0.9, 15), (0.1, 3)):
        ab = float(CosineSchedule().alpha_bar(t))
        x_t = (1 - ab) ** 0.5 * noise
        denoiser.denoise(x_t, ab, patch_size=k)  # compiled already; warm
        torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            denoiser.denoise(x_t, ab, patch_size=k)
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:8]
        gpu = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e6
        print(f"profile k={k:2d}: one call {wall:.3f} s wall (profiled), GPU kernels {gpu:.3f} s:")
        for e in events:
            print(f"   {e.device_time_total / 1e3:9.1f} ms  {e.count:6d} x  {e.key[:90]}")
        out[str(k)] = {"wall_s": wall, "gpu_s": gpu,
                       "top": [(e.key[:90], e.device_time_total / 1e6, e.count) for e in events]}
    results["profile"] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-timing", action="store_true", help="run the correctness checks only")
    parser.add_argument("--no-engine", action="store_true", help="time the fused path only (not the engine)")
    parser.add_argument("--out", type=Path, help="folder for gpu_check_fused.json (the measured numbers)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, in this order: {','.join(STAGES)} (default: all)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.stages.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        parser.error(f"unknown stages {unknown}; expected some of {list(STAGES)}")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check needs a GPU (on CPU, tests/test_fused_kernel.py runs the interpreter)")
    import triton

    results = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
               "date": time.strftime("%Y-%m-%d")}
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}", flush=True)

    def save() -> None:
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "gpu_check_fused.json").write_text(json.dumps(results, indent=1, default=str))

    runners = {"kernel": check_kernel, "tiles": time_tiles, "els": check_els,
               "sample": lambda r: time_sample(r, engine_too=not args.no_engine), "profile": profile_calls}
    timing = {"tiles", "sample", "profile"}
    stages = [(name, runners[name]) for name in STAGES
              if name in chosen and not (args.skip_timing and name in timing)]
    failed = []
    for name, stage in stages:  # one shot on a lent GPU: a stage that breaks is reported and the others still run
        start = time.perf_counter()
        try:
            stage(results)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            failed.append(name)
        print(f"-- stage {name} done in {time.perf_counter() - start:.1f} s", flush=True)
        results["tiles_used"] = {p: list(TILES[p]) for p in PRECISIONS}
        save()
    if failed:
        sys.exit(f"stages that broke: {failed}")
    checks = [v["ok"] for stage in ("kernel", "els") for v in results.get(stage, {}).values()]
    if not all(checks):
        sys.exit("a precision of the fused kernel differs from the float64 reference beyond its tolerance")


if __name__ == "__main__":
    main()
