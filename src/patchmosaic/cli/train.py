"""``patchmosaic train``: train a minimal ResNet/UNet eps-prediction network.

The command resolves its flags into a :class:`~patchmosaic.training.TrainConfig`
and calls :func:`~patchmosaic.training.train`. It is registered into the main
group by :mod:`patchmosaic.cli` (``main.add_command(train)``). Library errors
(``ValueError``, ``OSError`` such as ``FileExistsError``, ``ImportError``)
become ``Error: ...`` messages without a traceback.
"""

from __future__ import annotations

from pathlib import Path

import click

from patchmosaic.checkpoints import CHECKPOINT_FILE
from patchmosaic.models import (
    ARCHS,
    PADDING_MODES,
    ModelConfig,
    ResNetConfig,
    UNetConfig,
)
from patchmosaic.runs import CONFIG_FILE, undo_new_dir_on_failure
from patchmosaic.training import LOG_FILE, SUMMARY_FILE, ResumeMismatch, TrainConfig
from patchmosaic.training import train as train_run

__all__ = ["train"]

_TRAIN_DEFAULTS = TrainConfig()
TRAIN_FILES = (CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE, SUMMARY_FILE)
# Training-config fields (model fields as model.<name>) and the flags that set them.
_FLAGS = {
    "dataset": "--dataset", "n_train": "--n-train", "image_size": "--size", "conditional": "--conditional",
    "batch_size": "--batch-size", "lr": "--lr", "weight_decay": "--weight-decay", "ema": "--ema", "seed": "--seed",
    "model.arch": "--arch", "model.width": "--width", "model.base_width": "--width", "model.depth": "--depth",
    "model.channel_mults": "--channel-mults", "model.blocks_per_level": "--blocks-per-level",
    "model.padding_mode": "--padding", "model.norm_groups": "--norm-groups", "model.attention": "--attention",
    "model.attention_heads": "--attention-heads",
}


def _check_out(out: Path, resume: bool) -> None:
    """--out and --resume as usage errors (exit 2), before any work; nothing is created."""
    if out.exists() and not out.is_dir():
        raise click.BadParameter(f"{out} exists and is not a directory; choose another --out", param_hint="'--out'")
    checkpoint = out / CHECKPOINT_FILE
    if resume and not checkpoint.is_file():
        raise click.BadParameter(f"nothing to resume: {out} has no {CHECKPOINT_FILE}", param_hint="'--resume'")
    if not resume and out.is_dir() and any(out.iterdir()):
        hint = (f"it holds a training run ({CHECKPOINT_FILE}): pass --resume to continue it"
                if checkpoint.exists() else f"train writes {', '.join(TRAIN_FILES)} there")
        raise click.BadParameter(f"output directory {out} exists and is not empty ({hint}); choose another --out",
                                 param_hint="'--out'")


def _mismatch_message(err: ResumeMismatch) -> str:
    """The differing settings of a resumed run, in flag terms."""
    parts, seen = [], set()
    for key, saved, now in err.differences:
        flag = _FLAGS.get(key)
        if flag is None:  # derived from the data (channels, classes, size) or not a flag
            parts.append(f"{key} {saved!r} in the run, {now!r} now (follows from --dataset/--size/--conditional)")
            continue
        if flag in seen or (key.startswith("model.") and flag != "--arch" and any(
                k == "model.arch" for k, _, _ in err.differences)):
            continue  # another arch has other fields: --arch says it
        seen.add(flag)
        parts.append(f"{flag} {_show(saved)} in the run, {_show(now)} now")
    return (f"cannot --resume {err.path.parent}: these flags differ from the run's: {'; '.join(parts)}. "
            "Rerun with the run's values (see its config.json); only --steps, --checkpoint-every, --log-every, "
            "--threads, --device and --channels-last may change")


def _show(value: object) -> str:
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return "on" if value is True else "off" if value is False else str(value)
_RESNET_DEFAULTS = ResNetConfig()
_UNET_DEFAULTS = UNetConfig()


def _parse_mults(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        mults = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of integers", param_hint="'--channel-mults'"
        ) from None
    return mults


def _model_config(
    arch: str,
    padding: str,
    width: int | None,
    depth: int | None,
    mults: str | None,
    blocks: int | None,
    norm: int,
    attention: bool,
    heads: int | None,
) -> ModelConfig:
    """The architecture from the flags, refusing flags of the other arch."""
    if arch == "resnet":
        for flag, value in (("--channel-mults", mults), ("--blocks-per-level", blocks),
                            ("--attention", attention or None), ("--attention-heads", heads)):
            if value is not None:
                raise click.BadParameter(f"{flag} applies to --arch unet only", param_hint=f"'{flag}'")
        return ResNetConfig(
            width=_RESNET_DEFAULTS.width if width is None else width,
            depth=_RESNET_DEFAULTS.depth if depth is None else depth,
            padding_mode=padding,
            norm_groups=norm,
        )
    if depth is not None:
        raise click.BadParameter(
            "--depth applies to --arch resnet only (use --blocks-per-level)", param_hint="'--depth'"
        )
    if heads is not None and not attention:
        raise click.BadParameter("--attention-heads applies with --attention only", param_hint="'--attention-heads'")
    return UNetConfig(
        base_width=_UNET_DEFAULTS.base_width if width is None else width,
        channel_mults=_UNET_DEFAULTS.channel_mults if mults is None else _parse_mults(mults),
        blocks_per_level=_UNET_DEFAULTS.blocks_per_level if blocks is None else blocks,
        padding_mode=padding,
        norm_groups=norm,
        attention=attention,
        attention_heads=_UNET_DEFAULTS.attention_heads if heads is None else heads,
    )


@click.command("train")
@click.option("--dataset", default=_TRAIN_DEFAULTS.dataset, show_default=True,
              help="Training set: bundled name (mnist, fashion-mnist), 'torchvision:<name>' or a path (.npz, ...).")
@click.option("--n-train", type=click.IntRange(min=1), default=_TRAIN_DEFAULTS.n_train, show_default=True,
              help="Train on the first N images (bundled sets are class balanced in every prefix).")
@click.option("--size", type=click.IntRange(min=1), default=_TRAIN_DEFAULTS.image_size, show_default=True,
              help="Resize images to SIZE x SIZE (bilinear; MNIST 28 -> 32 as in the paper).")
@click.option("--arch", type=click.Choice(tuple(ARCHS)), default="resnet", show_default=True,
              help="Network: resnet (full resolution, local) or unet (pooling pyramid; --attention adds "
              "self-attention).")
@click.option("--padding", type=click.Choice(PADDING_MODES), default="zeros", show_default=True,
              help="Padding mode of every convolution.")
@click.option("--conditional", is_flag=True, default=False,
              help="Train a class-conditional model (needs labels).  [default: unconditional]")
@click.option("--width", type=click.IntRange(min=1), default=None,
              help=f"Channels (resnet) or base channels (unet).  "
              f"[default: {_RESNET_DEFAULTS.width} resnet, {_UNET_DEFAULTS.base_width} unet]")
@click.option("--depth", type=click.IntRange(min=1), default=None,
              help="Residual blocks of the resnet (receptive field 4 * depth + 5).  "
              f"[default: {_RESNET_DEFAULTS.depth}]")
@click.option("--channel-mults", default=None,
              help="UNet channel multiplier per level, e.g. '1,2,2'.  "
              f"[default: {','.join(map(str, _UNET_DEFAULTS.channel_mults))}]")
@click.option("--blocks-per-level", type=click.IntRange(min=1), default=None,
              help=f"UNet residual blocks per level.  [default: {_UNET_DEFAULTS.blocks_per_level}]")
@click.option("--attention", is_flag=True, default=False,
              help="UNet only: add a multi-head self-attention block at the lowest resolution (the paper's "
              "mnist-unet-attention; the network is then not local).  [default: off]")
@click.option("--attention-heads", type=click.IntRange(min=1), default=None,
              help="Heads of the --attention block (must divide the lowest level's channels).  "
              f"[default: {_UNET_DEFAULTS.attention_heads}]")
@click.option("--norm-groups", type=click.IntRange(min=0), default=_RESNET_DEFAULTS.norm_groups, show_default=True,
              help="GroupNorm groups (must divide the widths); 0 = no normalisation (strictly local resnet).")
@click.option("--steps", type=click.IntRange(min=1), default=_TRAIN_DEFAULTS.steps, show_default=True,
              help="Training iterations (optimizer steps).")
@click.option("--batch-size", type=click.IntRange(min=1), default=_TRAIN_DEFAULTS.batch_size, show_default=True,
              help="Images per iteration.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=_TRAIN_DEFAULTS.lr, show_default=True,
              help="AdamW learning rate (constant).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=_TRAIN_DEFAULTS.weight_decay,
              show_default=True, help="AdamW weight decay.")
@click.option("--ema", type=click.FloatRange(min=0, max=1, max_open=True), default=_TRAIN_DEFAULTS.ema,
              show_default=True, help="EMA decay of the sampling weights (0 disables EMA).")
@click.option("--seed", type=click.IntRange(min=0), default=_TRAIN_DEFAULTS.seed, show_default=True,
              help="Seed of the initial weights, data order, times and noise.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help=f"Run directory for {CHECKPOINT_FILE}, config.json, {LOG_FILE} and {SUMMARY_FILE}.")
@click.option("--resume", is_flag=True, default=False,
              help=f"Continue the run in --out from its {CHECKPOINT_FILE} (same flags; --steps may grow).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=_TRAIN_DEFAULTS.checkpoint_every,
              show_default=True, help=f"Write {CHECKPOINT_FILE} every N iterations (0: only at the end).")
@click.option("--log-every", type=click.IntRange(min=1), default=_TRAIN_DEFAULTS.log_every, show_default=True,
              help=f"Append the mean loss to {LOG_FILE} every N iterations.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch.set_num_threads during training.  [default: torch's choice]")
@click.option("--device", default=_TRAIN_DEFAULTS.device, show_default=True, help="Torch device, e.g. cpu or cuda.")
@click.option("--channels-last/--no-channels-last", default=_TRAIN_DEFAULTS.channels_last, show_default=True,
              help="Weights and activations in channels-last memory format (float rounding only; faster on CPU).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
def train(
    dataset: str,
    n_train: int,
    size: int,
    arch: str,
    padding: str,
    conditional: bool,
    width: int | None,
    depth: int | None,
    channel_mults: str | None,
    blocks_per_level: int | None,
    norm_groups: int,
    attention: bool,
    attention_heads: int | None,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    ema: float,
    seed: int,
    out: Path,
    resume: bool,
    checkpoint_every: int,
    log_every: int,
    threads: int | None,
    device: str,
    channels_last: bool,
    progress: bool,
) -> None:
    """Train an eps-prediction ResNet/UNet (Kamb & Ganguli App. B) on a training set.

    \b
    Example:
      patchmosaic train --dataset mnist --n-train 1000 --arch resnet --padding zeros \\
        --steps 20000 --out runs/resnet-mnist
    """
    try:
        model = _model_config(
            arch, padding, width, depth, channel_mults, blocks_per_level, norm_groups, attention, attention_heads
        )
        config = TrainConfig(
            dataset=dataset,
            n_train=n_train,
            image_size=size,
            conditional=conditional,
            model=model,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            weight_decay=weight_decay,
            ema=ema,
            seed=seed,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            threads=threads,
            device=device,
            channels_last=channels_last,
        )
        _check_out(out, resume)
        # A failure before the first checkpoint leaves no new, half-written --out behind.
        with undo_new_dir_on_failure(out, files=(CONFIG_FILE, LOG_FILE), keep_if=CHECKPOINT_FILE):
            summary = train_run(config, out, resume=resume, progress=progress)
    except ResumeMismatch as err:
        raise click.BadParameter(_mismatch_message(err), param_hint="'--resume'") from err
    except (ValueError, OSError, ImportError) as err:
        raise click.ClickException(str(err)) from err
    first, last = (summary["resumed_from_step"] or 0) + 1, summary["steps"]
    if first > last:
        done = f"nothing to train: the run is already at step {last}"
    else:
        resumed = f" (resumed from step {first - 1})" if summary["resumed_from_step"] is not None else ""
        done = f"trained steps {first}-{last}{resumed}"
    click.echo(
        f"{done} in {summary['wall_seconds']:.1f} s "
        f"({summary['iterations_per_second']:.2f} it/s), final loss {summary['final_loss'] or float('nan'):.4f}; "
        f"wrote {summary['checkpoint']} ({summary['checkpoint_mb']:.2f} MB)"
    )
