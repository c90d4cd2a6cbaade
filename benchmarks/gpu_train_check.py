"""Prepared one-shot check: the Table-1 networks trained on a GPU match CPU training, and how fast.

Not run on a GPU yet (no device was left in the session that wrote it). Needs
a CUDA GPU and a CUDA build of torch; about 3 minutes on one H200 at the
defaults.

    python benchmarks/gpu_train_check.py --out DIR          # DIR/gpu_train_check.json
    python benchmarks/gpu_train_check.py --device cpu       # the same comparison CPU vs CPU (a dry run)

For each recipe of ``scripts/reproduce_table1.sh`` (ResNet, UNet, UNet with
attention; bundled MNIST, 1,000 images, batch 64, lr 5e-4, EMA 0.999, seed 0):

1. Agreement: ``--steps`` iterations (default 100) on the CPU and on the device
   from the same seed (batches, times and noise are drawn on the CPU, so both
   see the same data), loss logged every iteration. Reported: the largest
   relative difference of the per-iteration losses, and of the final EMA
   weights, with cuDNN's TF32 convolutions as torch leaves them
   (``torch.backends.cudnn.allow_tf32``, on by default) and with them off
   (float32 rounding only). The float32 trajectories drift apart slowly in
   any case (Adam amplifies rounding), so the losses are compared, not bits.
2. Speed: the device run is extended by ``--time-steps`` iterations (default
   1,000) with ``resume``; steps/s over those, and the minutes the recipe's
   4,000 steps would take.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from patchmosaic.models import ResNetConfig, UNetConfig
from patchmosaic.training import (
    CHECKPOINT_FILE,
    LOG_FILE,
    SUMMARY_FILE,
    TrainConfig,
    train,
)

RECIPES = {  # the models of scripts/reproduce_table1.sh (as benchmarks/bench_train.py)
    "resnet": ResNetConfig(width=32, depth=4, norm_groups=0),
    "unet": UNetConfig(base_width=32),
    "attention": UNetConfig(base_width=32, attention=True),
}
RECIPE_STEPS = 4000  # TRAIN_STEPS of scripts/reproduce_table1.sh


def config_for(arch: str, steps: int, device: str, threads: int | None) -> TrainConfig:
    return TrainConfig(dataset="mnist", n_train=1000, image_size=32, model=RECIPES[arch], steps=steps, batch_size=64,
                       lr=5e-4, ema=0.999, seed=0, checkpoint_every=0, log_every=1, threads=threads, device=device)


def losses(run: Path) -> torch.Tensor:
    """Per-iteration training losses of a run (``train_log.jsonl`` with ``log_every = 1``)."""
    lines = (run / LOG_FILE).read_text().splitlines()
    return torch.tensor([json.loads(line)["loss"] for line in lines], dtype=torch.float64)


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The saved (EMA) weights of a run's checkpoint, as float64 on the CPU."""
    state = torch.load(run / CHECKPOINT_FILE, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v.double() for k, v in state.items() if v.is_floating_point()}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(arch: str, device: str, steps: int, time_steps: int, tmp: Path) -> dict:
    out = {}
    cpu_run = tmp / f"{arch}-cpu"
    train(config_for(arch, steps, "cpu", os.cpu_count()), cpu_run, progress=False)
    cpu_losses, cpu_weights = losses(cpu_run), weights(cpu_run)
    default_tf32, runs = torch.backends.cudnn.allow_tf32, {}
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        run = runs[tf32] = tmp / f"{arch}-{device}-tf32{int(tf32)}"
        train(config_for(arch, steps, device, None), run, progress=False)
        dev_losses, dev_weights = losses(run), weights(run)
        name = "cudnn TF32 on (torch's default)" if tf32 else "cudnn TF32 off"
        result = {
            "max_rel_loss_diff": relative(dev_losses, cpu_losses),
            "loss_diff_first_10": relative(dev_losses[:10], cpu_losses[:10]),
            "max_rel_weight_diff": max(relative(dev_weights[k], cpu_weights[k]) for k in cpu_weights),
        }
        out[name] = result
        print(f"{arch:9s} {device} vs cpu, {steps} iterations, {name:31s}: losses differ by <= "
              f"{result['max_rel_loss_diff']:.1e} relative ({result['loss_diff_first_10']:.1e} over the first 10), "
              f"final weights by <= {result['max_rel_weight_diff']:.1e}", flush=True)
    torch.backends.cudnn.allow_tf32 = default_tf32
    run = runs[default_tf32]  # extend the run with torch's setting to time it
    before = json.loads((run / SUMMARY_FILE).read_text())["train_seconds"]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    summary = train(config_for(arch, steps + time_steps, device, None), run, resume=True, progress=False)
    seconds = summary["train_seconds"] - before
    rate = summary["iterations_this_call"] / seconds
    out["steps_per_s"] = rate
    out["recipe_minutes"] = RECIPE_STEPS / rate / 60
    print(f"{arch:9s} {device}: {rate:.1f} steps/s over {summary['iterations_this_call']} iterations "
          f"(the recipe's {RECIPE_STEPS} steps: {out['recipe_minutes']:.1f} min)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="device to compare with the CPU (default cuda)")
    parser.add_argument("--archs", default=",".join(RECIPES), help=f"comma list of {', '.join(RECIPES)}")
    parser.add_argument("--steps", type=int, default=100, help="iterations compared with the CPU run")
    parser.add_argument("--time-steps", type=int, default=1000, help="iterations timed on the device")
    parser.add_argument("--out", type=Path, help="folder for gpu_train_check.json")
    args = parser.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    unknown = sorted(set(archs) - set(RECIPES))
    if unknown:
        parser.error(f"unknown --archs {unknown}; choose from {sorted(RECIPES)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a dry run of the comparison")
    results = {"torch": torch.__version__, "device": args.device, "date": time.strftime("%Y-%m-%d"),
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "cpu_threads": os.cpu_count(), "steps": args.steps, "time_steps": args.time_steps}
    with tempfile.TemporaryDirectory(prefix="gpu_train_check_") as tmp:
        for arch in archs:
            results[arch] = check(arch, args.device, args.steps, args.time_steps, Path(tmp))
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "gpu_train_check.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
