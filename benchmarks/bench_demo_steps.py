"""The demo's sampling work, step by step, in two source trees interleaved: ``make demo``'s ratio.

Runs the 20 denoiser calls of ``patchmosaic sample --dataset mnist --machine els
--padding zeros --patch-sizes mnist-resnet-zeros --n-train 1000 --seeds 0-7
--provenance`` (8 seeds batched, N_eff and entropy at every step, the top 8
candidates at the last; Euler/DDIM steps from the seeds' initial noise) in one
child process per source tree. The children hold their machines and take turns
step by step (the first to run alternates), so both see the same CPU load.

    python benchmarks/bench_demo_steps.py --baseline-src /path/to/old/src [--threads 1]

``--baseline-src`` is a ``src`` folder of another checkout whose package is
``patchmosaic`` (e.g. ``git archive BASE src | tar -x -C /tmp/base``); the
current tree is this file's ``../src``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(src: str, threads: int) -> None:
    """Serve step indices from stdin: run that step, answer its seconds (after a warm-up call)."""
    sys.path.insert(0, src)
    import torch

    from patchmosaic import ScoreMachine, noise_for_seeds
    from patchmosaic.data import load_dataset
    from patchmosaic.samplers import initial_state
    from patchmosaic.schedules import sigmas_cosine

    if threads:
        torch.set_num_threads(threads)
    machine = ScoreMachine(load_dataset("mnist", n_train=1000).images, kind="els", padding="zeros")
    bound = machine.bind(patch_sizes="mnist-resnet-zeros")
    sigmas = sigmas_cosine(20)
    x = initial_state(noise_for_seeds(range(8), machine.image_shape), sigmas)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        i = int(line)
        s = float(sigmas[i])
        start = time.perf_counter()
        x0, _ = bound.with_provenance(x, s, top=8 if i == len(sigmas) - 2 else 0)
        secs = time.perf_counter() - start
        x = x + (float(sigmas[i + 1]) - s) * (x - x0) / s if sigmas[i + 1] > 0 else x0
        print(json.dumps({"seconds": secs, "sigma": s, "k": bound.patch_size_at(s)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline-src", required=True, help="src folder of the baseline checkout")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per child (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads)
        return
    trees = {"baseline": str(Path(args.baseline_src).resolve()), "current": str(HERE.parent / "src")}
    procs = {
        name: subprocess.Popen([sys.executable, __file__, "--baseline-src", src, "--child", src,
                                "--threads", str(args.threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
        for name, src in trees.items()
    }
    for p in procs.values():
        json.loads(p.stdout.readline())
    total = {name: 0.0 for name in procs}
    print("| step | sigma | k | baseline | current | ratio |\n|---|---|---|---|---|---|")
    for i in range(20):
        order = list(procs) if i % 2 == 0 else list(procs)[::-1]
        got = {}
        for name in order:
            procs[name].stdin.write(f"{i}\n")
            procs[name].stdin.flush()
            got[name] = json.loads(procs[name].stdout.readline())
            total[name] += got[name]["seconds"]
        b, c = got["baseline"]["seconds"], got["current"]["seconds"]
        print(f"| {i} | {got['current']['sigma']:.3f} | {got['current']['k']} | {b:.2f} s | {c:.2f} s | "
              f"{b / c:.2f}x |", flush=True)
    for p in procs.values():
        p.stdin.close()
        p.wait()
    print(f"total: baseline {total['baseline']:.1f} s, current {total['current']:.1f} s "
          f"({total['baseline'] / total['current']:.2f}x)")


if __name__ == "__main__":
    main()
