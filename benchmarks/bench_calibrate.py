"""Calibration's machine work per step: every candidate size in one call against one call per size.

``patchmosaic calibrate`` scores every candidate patch size on the network's
``x`` at each step. It now makes one :meth:`ScoreMachine.denoise_sizes` call
(sizes >= 7 in one stream sharing the products of nested windows,
:mod:`patchmosaic.nested`; smaller sizes by the single-size path) where it used
to make one full machine call per size (``calibrate --separate-calls``). This
script times, interleaved round by round on the same noisy batch:

* ``shared``: ``denoise_sizes(x, sigma, candidates)``;
* ``separate``: one ``machine(x, sigma, patch_size=k)`` per candidate;
* ``largest``: one call at the largest candidate;
* ``chosen``: one call at the size the committed calibrated schedule picks at that sigma,

for MNIST (zeros and circular padding, unconditional) and Fashion-MNIST (zeros,
class-conditional: every query sees its class's images), queries = held-out
images noised at sigma, and reports the ratios ``separate / shared``,
``shared / largest`` and ``shared / chosen`` (calibration's cost in machine calls), and
``pairs all / largest``: the (pixel, candidate) pairs of all candidate sizes over those of the largest, from
the geometry (what each size's softmax must visit; no sharing of products removes them).

    PYTHONPATH=src python benchmarks/bench_calibrate.py --threads 1
    PYTHONPATH=src python benchmarks/bench_calibrate.py --n-train 1000 --queries 10 --sigmas 1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from patchmosaic import PatchSchedule, ScoreMachine
from patchmosaic.data import load_dataset

CASES = {  # name: (dataset, padding, conditional, committed schedule)
    "mnist-zeros": ("mnist", "zeros", False, "mnist-resnet-zeros"),
    "fashion-zeros-cond": ("fashion-mnist", "zeros", True, "fashion-resnet-zeros-cond"),
    "mnist-circular": ("mnist", "circular", False, "mnist-resnet-zeros"),
}
PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=300)
    parser.add_argument("--queries", type=int, default=4, help="noisy held-out images per call (the seeds)")
    parser.add_argument("--sigmas", default="2,0.5", help="noise levels, comma-separated")
    parser.add_argument("--candidates", default="3,5,7,9,11,13,15,17,19,21")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the minimum counts")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cands = [int(k) for k in args.candidates.split(",")]
    results = []
    for case in args.cases.split(","):
        dataset, padding, conditional, schedule = CASES[case]
        data = load_dataset(dataset, n_train=args.n_train + args.queries)
        train, held = data.images[: args.n_train], data.images[args.n_train :]
        labels = data.labels[: args.n_train] if conditional else None
        label = data.labels[args.n_train :] if conditional else None
        machine = ScoreMachine(train, kind="els", padding=padding, labels=labels)
        chosen_at = PatchSchedule.load(PRETRAINED / schedule / "schedule.json")
        for sigma in (float(s) for s in args.sigmas.split(",")):
            g = torch.Generator().manual_seed(0)
            x = held + sigma * torch.randn(held.shape, generator=g)
            chosen = chosen_at.size_at(sigma)
            timed = {
                "shared": lambda m=machine, x=x, s=sigma, y=label: m.denoise_sizes(x, s, cands, label=y),
                "separate": lambda m=machine, x=x, s=sigma, y=label: [m(x, s, patch_size=k, label=y) for k in cands],
                "largest": lambda m=machine, x=x, s=sigma, y=label: m(x, s, patch_size=max(cands), label=y),
                "chosen": lambda m=machine, x=x, s=sigma, y=label, k=chosen: m(x, s, patch_size=k, label=y),
            }
            shared = timed["shared"]()
            worst = max(float((shared[k] - machine(x, sigma, patch_size=k, label=label)).abs().max()) for k in cands)
            best = {name: float("inf") for name in timed}
            for _ in range(args.rounds):
                for name, fn in timed.items():
                    start = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - start)
            row = {
                "case": case, "sigma": sigma, "chosen_k": chosen, "seconds": {k: round(v, 3) for k, v in best.items()},
                "separate_over_shared": round(best["separate"] / best["shared"], 2),
                "shared_over_largest": round(best["shared"] / best["largest"], 2),
                "shared_over_chosen": round(best["shared"] / best["chosen"], 2),
                "pairs_all_over_largest": round(sum(pairs(machine, k) for k in cands) / pairs(machine, max(cands)), 1),
                "max_abs_difference": worst,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    print("\n| case | sigma | separate | shared | speedup | shared / one call at 21 | shared / one call at chosen k "
          "| pairs, all sizes / 21 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        s = r["seconds"]
        print(f"| {r['case']} | {r['sigma']:g} | {s['separate']:.1f} s | {s['shared']:.1f} s | "
              f"{r['separate_over_shared']:.2f}x | {r['shared_over_largest']:.1f} | "
              f"{r['shared_over_chosen']:.1f} (k = {r['chosen_k']}) | {r['pairs_all_over_largest']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


def pairs(machine: ScoreMachine, k: int) -> int:
    """(query pixel, candidate centre) pairs of one ELS call at size k, per query and training image."""
    geo = machine._geometry(k)  # the geometry the machine's own call at size k uses
    per_axis = [sum(blk.P.shape[1] * blk.Q.shape[1] * blk.P.shape[0] for blk in axis) for axis in (geo.rows, geo.cols)]
    return per_axis[0] * per_axis[1]


if __name__ == "__main__":
    main()
