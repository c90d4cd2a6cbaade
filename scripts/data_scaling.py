"""How ELS samples depend on the training-set size: n_train = 100 ... 10000 against the 10000 output.

    python scripts/data_scaling.py --seeds 0-7 --out docs/data_scaling   # then see data_scaling.json / .png

ELS on the bundled MNIST (first n_train images, resized to 32 x 32 as the
published mnist-resnet-zeros model), zero padding, the published
mnist-resnet-zeros schedule, deterministic DDIM (sample_euler) on the 20-step
cosine grid, the same seeds for every n_train. The largest n_train is run first
(it is the reference); each n_train's samples are saved as they finish
(samples_<n>.npz, reused by a rerun with the same seeds), so an interrupted run
keeps what it has. Reports, per
n_train, the Pearson r of each seed's final image with the largest n_train's
image, its median and range, and the seconds per sample.

With ``--model`` (an unconditional network on bundled MNIST, e.g.
``pretrained:mnist-resnet-zeros``, trained on 1,000 images) the network is
sampled once from the same seeds with ``--network-steps`` DDIM steps (150, the
paper's protocol; saved as samples_network.npz) and every n_train's ELS samples
are also compared with it: does a machine on fewer or more images than the
network saw predict it better or worse?

    python scripts/data_scaling.py --seeds 0-7 --model pretrained:mnist-resnet-zeros \
        --schedule pretrained/mnist-resnet-zeros/schedule.json --out docs/data_scaling_network
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from patchmosaic.checkpoints import load_checkpoint, load_denoiser
from patchmosaic.data import load_dataset
from patchmosaic.denoisers import ScoreMachine
from patchmosaic.evaluation import pearson_r
from patchmosaic.pretrained import resolve_model, training_set
from patchmosaic.runs import parse_seeds
from patchmosaic.samplers import sample_seeds
from patchmosaic.schedules import PatchSchedule, sigmas_cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", default="100,300,1000,3000,10000", help="Training-set sizes (comma-separated).")
    parser.add_argument("--seeds", default="0-7", help="Seeds.")
    parser.add_argument("--size", type=int, default=32, help="Image side (the published schedule's 32).")
    parser.add_argument("--schedule", default="mnist-resnet-zeros", help="Locality schedule (preset or list).")
    parser.add_argument("--batch-size", type=int, default=8, help="Seeds per sampler call.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice).")
    parser.add_argument("--model", default=None,
                        help="Also compare every n_train's ELS samples with this unconditional MNIST network "
                        "(pretrained:NAME, a run directory or a checkpoint).")
    parser.add_argument("--network-steps", type=int, default=150, help="DDIM steps of the network (paper: 150).")
    parser.add_argument("--out", type=Path, required=True, help="Directory for samples_<n>.npz, data_scaling.json/.png.")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    network = _network(args.model, args.size) if args.model else None
    sizes = sorted({int(n) for n in args.n_train.split(",")}, reverse=True)  # the reference first
    seeds = parse_seeds(args.seeds)
    schedule = PatchSchedule.parse(args.schedule)
    sigmas = sigmas_cosine(len(schedule))
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[int, float] = {}
    for n in sizes:
        path = args.out / f"samples_{n}.npz"
        if path.is_file():  # finished earlier: only if for the same seeds
            have = np.load(path)["seeds"].tolist()
            if have != seeds:
                raise SystemExit(f"{path} holds seeds {have}, not {seeds}: use another --out or remove it")
            continue
        data = load_dataset("mnist", n_train=n, size=args.size)
        machine = ScoreMachine(data.images, kind="els", padding="zeros").bind(patch_sizes=schedule)
        start = time.perf_counter()
        images = sample_seeds(machine, seeds, tuple(data.images.shape[1:]), sigmas=sigmas,
                              batch_size=args.batch_size)  # [S, C, H, W]
        seconds[n] = (time.perf_counter() - start) / len(seeds)
        np.savez(path, images=images.numpy(), seeds=np.array(seeds), seconds_per_sample=seconds[n])
        print(f"n_train={n}: {seconds[n]:.1f} s/sample", flush=True)
    net_images = None
    if network is not None:
        path = args.out / "samples_network.npz"
        if path.is_file():
            saved = np.load(path)
            if saved["seeds"].tolist() != seeds or int(saved["network_steps"]) != args.network_steps:
                raise SystemExit(f"{path} holds other seeds or step counts: use another --out or remove it")
            net_images = saved["images"]
        else:
            net_images = sample_seeds(network["denoiser"], seeds, network["shape"],
                                      sigmas=sigmas_cosine(args.network_steps), batch_size=args.batch_size).numpy()
            np.savez(path, images=net_images, seeds=np.array(seeds), network_steps=args.network_steps)
    ref_n = sizes[0]
    ref = np.load(args.out / f"samples_{ref_n}.npz")["images"]
    rows = []
    for n in sorted(sizes):
        archive = np.load(args.out / f"samples_{n}.npz")
        r = pearson_r(ref, archive["images"])  # [S]
        row = {"n_train": n, "pearson_r_per_seed": [float(v) for v in r], "median_r": float(np.median(r)),
               "min_r": float(r.min()), "max_r": float(r.max()),
               "seconds_per_sample": float(archive["seconds_per_sample"])}
        line = (f"n_train={n:>6}: median r with n_train={ref_n}: {np.median(r):.3f} "
                f"(range {r.min():.3f}..{r.max():.3f}), {float(archive['seconds_per_sample']):.1f} s/sample")
        if net_images is not None:
            rn = pearson_r(net_images, archive["images"])  # [S]
            row.update({"network_r_per_seed": [float(v) for v in rn], "network_median_r": float(np.median(rn)),
                        "network_min_r": float(rn.min()), "network_max_r": float(rn.max())})
            line += f"; with the network: median r {np.median(rn):.3f} (range {rn.min():.3f}..{rn.max():.3f})"
        rows.append(row)
        print(line)
    result = {"reference_n_train": ref_n, "seeds": seeds, "size": args.size, "schedule": list(schedule.sizes),
              "steps": len(schedule), "sampler": "euler (DDIM)", "grid": "cosine", "threads": torch.get_num_threads(),
              "rows": rows}
    if network is not None:
        result["network"] = {"model": args.model, "n_train": network["n_train"], "network_steps": args.network_steps}
    (args.out / "data_scaling.json").write_text(json.dumps(result, indent=2))
    _figure(args.out / "data_scaling.png", rows, ref_n, network)


def _network(spec: str, size: int) -> dict:
    """The network of ``--model`` as a denoiser, after checking it is an unconditional bundled-MNIST model."""
    checkpoint = resolve_model(spec).checkpoint
    _, config, meta = load_checkpoint(checkpoint)
    ts = training_set(config, meta.get("train_config"))
    if ts.dataset != "mnist" or ts.num_classes or ts.padding != "zeros":
        raise SystemExit(f"--model {spec}: needs an unconditional network with zero padding trained on bundled "
                         f"mnist (it has dataset {ts.dataset!r}, {ts.num_classes} classes, padding {ts.padding!r})")
    if ts.image_size != size:
        raise SystemExit(f"--model {spec} works on {ts.image_size} px images, --size is {size}")
    return {"denoiser": load_denoiser(checkpoint), "shape": (1, size, size), "n_train": ts.n_train}


def _figure(path: Path, rows: list[dict], ref_n: int, network: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if network else 1, figsize=(9.6 if network else 4.8, 3.4), dpi=120, squeeze=False)
    ax = axes[0][0]
    for row in rows:
        ax.scatter([row["n_train"]] * len(row["pearson_r_per_seed"]), row["pearson_r_per_seed"], s=10, alpha=0.5,
                   color="#1f6feb")
    ax.plot([r["n_train"] for r in rows], [r["median_r"] for r in rows], "o-", color="#c33", label="median")
    ax.set_xscale("log")
    ax.set_xlabel("n_train (first images of bundled MNIST)")
    ax.set_ylabel(f"Pearson r with n_train = {ref_n}")
    ax.set_title("ELS (mnist-resnet-zeros schedule), same seeds", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if network:
        ax = axes[0][1]
        for row in rows:
            ax.scatter([row["n_train"]] * len(row["network_r_per_seed"]), row["network_r_per_seed"], s=10,
                       alpha=0.5, color="#1f6feb")
        ax.plot([r["n_train"] for r in rows], [r["network_median_r"] for r in rows], "o-", color="#c33",
                label="median")
        ax.axvline(network["n_train"], color="#888", ls="--", lw=1, label=f"network's n_train ({network['n_train']})")
        ax.set_xscale("log")
        ax.set_xlabel("n_train of the ELS machine")
        ax.set_ylabel("Pearson r with the network")
        ax.set_title("ELS vs the network, same seeds", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
