"""Training eps-prediction networks with the denoising score-matching loss.

One iteration draws a batch ``x0``, times ``t ~ U[t_min, 1]`` and noise
``eps ~ N(0, I)``, forms ``x_t = sqrt(abar(t)) x0 + sqrt(1 - abar(t)) eps``
under the cosine schedule, and takes an AdamW step on
``mean((net(x_t, t, label) - eps)^2)`` (Ho et al. 2020, Eq. 14; Kamb &
Ganguli App. B).

Randomness is a pure function of ``(seed, stream, index)`` (see
:func:`stream_seed`): the initial weights, the data order of epoch ``e`` and
the times/noise of iteration ``s`` each get their own ``torch.Generator``.
Nothing depends on hidden RNG state, so the same config gives the same weights
bit for bit on the CPU, and a resumed run (which restores the weights,
optimizer and EMA) continues exactly where an uninterrupted run would be.

A run directory holds ``model.pt`` (:mod:`patchmosaic.checkpoints`, written
atomically every ``checkpoint_every`` iterations and at the end),
``config.json`` (the resolved config), ``train_log.jsonl`` (``step``,
``loss``: the mean over the iterations since the previous line, ``seconds``:
training time so far) and, when done, ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from patchmosaic.checkpoints import (
    CHECKPOINT_FILE,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
)
from patchmosaic.data import ImageDataset, load_dataset
from patchmosaic.models import (
    ModelConfig,
    ResNetConfig,
    build_model,
    config_from_dict,
    config_to_dict,
)
from patchmosaic.runs import CONFIG_FILE, write_config
from patchmosaic.schedules import CosineSchedule

__all__ = [
    "LOG_FILE",
    "RESUMABLE_CHANGES",
    "SUMMARY_FILE",
    "ResumeMismatch",
    "TrainConfig",
    "resolve_config",
    "stream_seed",
    "train",
]

LOG_FILE = "train_log.jsonl"
SUMMARY_FILE = "summary.json"
FINAL_LOSS_WINDOW = 100  # summary's final_loss: mean over the last this many iterations

# Fields that may change when a run is resumed: they do not affect the weights
# (steps only extends or shortens the run; a device or memory-format change may
# alter rounding).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "threads", "device", "channels_last")

# Independent random streams of one run.
_STREAM_INIT, _STREAM_DATA, _STREAM_NOISE = 0, 1, 2


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    dataset: str = "mnist"  # load_dataset spec: bundled name, torchvision:<name> or a path
    n_train: int | None = 1000  # first n_train training images (None: all)
    image_size: int | None = 32  # resize images to this side (None: keep the stored size)
    conditional: bool = False  # class-conditional model (needs labels)
    model: ModelConfig = field(default_factory=ResNetConfig)  # arch + padding; C, size, classes come from the data
    steps: int = 20000  # optimizer iterations
    batch_size: int = 64  # images per iteration (drawn without replacement within an epoch)
    lr: float = 2e-4  # AdamW learning rate (constant)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    ema: float = 0.999  # EMA decay of the sampling weights, warmed up as min(ema, (1+n)/(10+n)); 0 disables
    seed: int = 0  # seeds weights, data order, times and noise
    t_min: float = 1e-3  # times are drawn from U[t_min, 1] (avoids abar = 1 exactly)
    checkpoint_every: int = 1000  # write model.pt every this many iterations (0: only at the end)
    log_every: int = 100  # append to train_log.jsonl every this many iterations
    threads: int | None = None  # torch.set_num_threads during training (None: leave as is)
    device: str = "cpu"  # torch device to train on
    # Weights and activations in channels-last memory format: the same arithmetic in another order
    # (float rounding only); 1.23x (ResNet), 1.22x (UNet), 1.13x (UNet with attention) steps/s on one CPU
    # thread (benchmarks/bench_train.py)
    channels_last: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                kind = "a non-negative" if allow_zero else "a positive"
                raise ValueError(f"{name} must be {kind} integer{' or None' if allow_none else ''}, got {v!r}")

        positive("n_train", allow_none=True)
        positive("image_size", allow_none=True)
        positive("steps")
        positive("batch_size")
        positive("checkpoint_every", allow_zero=True)
        positive("log_every")
        positive("threads", allow_none=True)
        positive("seed", allow_zero=True)
        if not isinstance(self.channels_last, bool):
            raise ValueError(f"channels_last must be True or False, got {self.channels_last!r}")
        config_to_dict(self.model)  # raises ValueError if it is not a model config
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {self.weight_decay!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must lie in [0, 1) (0 disables EMA), got {self.ema!r}")
        if not 0.0 < self.t_min < 1.0:
            raise ValueError(f"t_min must lie in (0, 1), got {self.t_min!r}")

    @property
    def arch(self) -> str:
        """``"resnet"`` or ``"unet"``."""
        return config_to_dict(self.model)["arch"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; the model config as :func:`~patchmosaic.models.config_to_dict`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["model"] = config_to_dict(self.model)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: On unknown fields or invalid values.
        """
        fields = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown training config field(s) {unknown}; known: {sorted(known)}")
        if "model" in fields:
            fields["model"] = config_from_dict(fields["model"])
        return cls(**fields)


def stream_seed(seed: int, stream: int, index: int = 0) -> int:
    """A 64-bit seed for random stream ``stream`` (init, data, noise) at ``index``.

    Mixed with :class:`numpy.random.SeedSequence`, so nearby ``(seed, index)``
    pairs give unrelated generators.
    """
    lo, hi = np.random.SeedSequence([seed, stream, index]).generate_state(2, dtype=np.uint32)
    return ((int(hi) << 32) | int(lo)) & 0x7FFF_FFFF_FFFF_FFFF


def _generator(seed: int, stream: int, index: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(stream_seed(seed, stream, index))


def resolve_config(config: TrainConfig, data: ImageDataset) -> TrainConfig:
    """Fill the model's data-derived fields (``in_channels``, ``image_size``, ``num_classes``).

    Raises:
        ValueError: For a conditional run on unlabelled data, or non-square images.
    """
    _, C, H, W = data.images.shape
    if H != W:
        raise ValueError(f"{data.name}: images are {H}x{W}; the networks need square images")
    num_classes = 0
    if config.conditional:
        if data.labels is None:
            raise ValueError(f"dataset {data.name!r} has no labels, so a conditional model cannot be trained")
        num_classes = len(data.classes) if data.classes else int(data.labels.max()) + 1
    model = dataclasses.replace(config.model, in_channels=C, image_size=H, num_classes=num_classes)
    return dataclasses.replace(config, model=model)


class EpochSampler:
    """Batch indices of iteration ``s`` as a pure function of ``(seed, s)``.

    The data stream is the concatenation of per-epoch permutations of
    ``range(n)``, the permutation of epoch ``e`` drawn from its own generator;
    iteration ``s`` takes positions ``[s B, (s + 1) B)`` of that stream.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm = lru_cache(maxsize=4)(self._permutation)

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=_generator(self.seed, _STREAM_DATA, epoch))  # [n]

    def indices(self, step: int) -> torch.Tensor:
        """``[B]`` long indices of the batch of iteration ``step``."""
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)  # [B]
        epochs, offsets = pos // self.n, pos % self.n  # [B], [B]
        out = torch.empty_like(pos)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[offsets[sel]]
        return out


def _ema_decay(decay: float, updates: int) -> float:
    """EMA decay after ``updates`` updates, warmed up as ``min(decay, (1 + n) / (10 + n))``."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class ResumeMismatch(ValueError):
    """The configuration of a resumed run differs from its checkpoint's.

    Attributes:
        differences: ``(key, saved, now)`` per differing field; model fields as ``model.<name>``.
    """

    def __init__(self, path: Path, differences: list[tuple[str, Any, Any]]) -> None:
        self.path = path
        self.differences = differences
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differences)
        super().__init__(
            f"cannot resume from {path}: the configuration differs from the saved one ({listed}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change"
        )


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"model": {"width": 8}}`` as ``{"model.width": 8}``."""
    flat = {k: v for k, v in config.items() if k != "model"}
    flat.update({f"model.{k}": v for k, v in (config.get("model") or {}).items()})
    return flat


def _check_resumable(saved: dict[str, Any] | None, current: TrainConfig, path: Path) -> None:
    if saved is None:
        raise ValueError(f"checkpoint {path} has no train_config, so the run cannot be resumed")
    saved = dict(saved)
    # Model fields added since the run was saved (the UNet's attention) take their defaults.
    with contextlib.suppress(KeyError, TypeError, ValueError):
        saved["model"] = config_to_dict(config_from_dict(saved["model"]))
    saved, now = (_flatten(json.loads(json.dumps(c))) for c in (saved, current.to_dict()))  # tuples as lists
    diffs = [
        (k, saved.get(k), now.get(k))
        for k in sorted(set(saved) | set(now))
        if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ResumeMismatch(path, diffs)


def _truncate_log(path: Path, step: int) -> None:
    """Keep only the log lines up to ``step`` (those covered by the checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    with atomic_write(path) as f:
        f.write((json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def train(config: TrainConfig, out_dir: str | Path, *, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train an eps-prediction network and write the run directory.

    Args:
        config: The run; the model's data-derived fields are filled by
            :func:`resolve_config` (the resolved config is what gets saved).
        out_dir: Run directory (created if needed).
        resume: Continue from ``out_dir/model.pt`` (weights, optimizer, EMA,
            step, recent losses); the config must match the saved one except
            for :data:`RESUMABLE_CHANGES`.
        progress: Show a tqdm bar with the loss, it/s and ETA on stderr.

    Returns:
        The summary also written to ``summary.json``: ``final_loss`` (mean of
        the last 100 iteration losses), ``wall_seconds`` (this call),
        ``train_seconds`` (all calls of the run), ``steps``, ``num_parameters``,
        ``checkpoint`` and ``checkpoint_mb``, among others.

    Raises:
        FileExistsError: Without ``resume``, if ``out_dir`` already has a checkpoint.
        FileNotFoundError: With ``resume``, if it has none; or a missing dataset.
        ValueError: On a bad dataset, a conditional run without labels, or a
            config that differs from the checkpoint's.
    """
    out = Path(out_dir)
    ckpt_path = out / CHECKPOINT_FILE
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if not resume and ckpt_path.exists():
        raise FileExistsError(
            f"{ckpt_path} already exists; resume that run (resume=True) or choose another output directory"
        )
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint {ckpt_path}")

    data = load_dataset(config.dataset, n_train=config.n_train, size=config.image_size)
    config = resolve_config(config, data)
    saved = load_checkpoint(ckpt_path) if resume else None
    if saved is not None:
        _check_resumable(saved[2]["train_config"], config, ckpt_path)
        if saved[2]["step"] > config.steps:
            raise ValueError(f"{ckpt_path} is at step {saved[2]['step']}, beyond steps={config.steps}")

    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _train(config, data, out, saved, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    config: TrainConfig,
    data: ImageDataset,
    out: Path,
    saved: tuple[Any, ModelConfig, dict[str, Any]] | None,
    progress: bool,
) -> dict[str, Any]:
    """The loop of :func:`train`, after validation."""
    wall_start = time.perf_counter()
    device = torch.device(config.device)
    ckpt_path, log_path = out / CHECKPOINT_FILE, out / LOG_FILE
    schedule = CosineSchedule()

    # 1. Model, optimizer and EMA: fresh from the seed, or restored.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(config.seed, _STREAM_INIT))
        model = build_model(config.model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if config.ema > 0 else None
    start, recent, seconds_before = 0, deque(maxlen=FINAL_LOSS_WINDOW), 0.0
    log_sum, log_count = 0.0, 0  # losses since the last train_log.jsonl line
    if saved is not None:
        sampling_model, _, meta = saved
        model.load_state_dict(meta["raw_state_dict"] if ema is not None else sampling_model.state_dict())
        if ema is not None:
            ema = {k: v.to(device).clone() for k, v in sampling_model.state_dict().items()}
        optimizer.load_state_dict(meta["optimizer"])
        start = int(meta["step"])
        recent.extend(meta["extra"].get("recent_losses", []))
        seconds_before = float(meta["extra"].get("train_seconds", 0.0))
        log_sum, log_count = float(meta["extra"].get("log_sum", 0.0)), int(meta["extra"].get("log_count", 0))
        _truncate_log(log_path, start)
    else:
        out.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")
    write_config(
        out / CONFIG_FILE,
        {
            "train": config.to_dict(),
            "dataset_name": data.name,
            "n_images": len(data),
            "image_shape": list(data.images.shape[1:]),
            "classes": None if data.classes is None else list(data.classes),
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "noise_schedule": f"cosine, alpha_bar(t) = cos^2((t / (1 + s)) pi / 2), s = {schedule.s}",
            "objective": f"eps-prediction MSE, t ~ U[{config.t_min}, 1]",
            "files": {"checkpoint": CHECKPOINT_FILE, "log": LOG_FILE, "summary": SUMMARY_FILE},
        },
    )

    images = data.images.to(device)  # [N, C, H, W]
    labels = data.labels.to(device) if config.conditional else None  # [N]
    sampler = EpochSampler(len(data), config.batch_size, config.seed)
    train_seconds = seconds_before

    def checkpoint(step: int) -> None:
        save_checkpoint(  # reads the loop's current recent/train_seconds/log_sum/log_count
            ckpt_path,
            model,
            config.model,
            ema=ema,
            optimizer=optimizer,
            step=step,
            train_config=config.to_dict(),
            extra={
                "recent_losses": list(recent),
                "train_seconds": train_seconds,
                "log_sum": log_sum,
                "log_count": log_count,
            },
        )

    # 2. The loop: iteration s uses batch s and the times/noise of generator (seed, s).
    bar = tqdm(
        total=config.steps, initial=start, desc="training", unit="it", file=sys.stderr,
        dynamic_ncols=True, disable=not progress,
    )
    loop_start = time.perf_counter()
    with bar:
        for step in range(start, config.steps):
            idx = sampler.indices(step).to(device)  # [B]
            x0 = images[idx]  # [B, C, H, W]
            g = _generator(config.seed, _STREAM_NOISE, step)
            t = config.t_min + (1.0 - config.t_min) * torch.rand(len(idx), generator=g, dtype=torch.float64)  # [B]
            eps = torch.randn(x0.shape, generator=g).to(device)  # [B, C, H, W]
            abar = schedule.alpha_bar(t).to(device=device, dtype=x0.dtype)[:, None, None, None]  # [B, 1, 1, 1]
            x_t = (abar.sqrt() * x0 + (1.0 - abar).sqrt() * eps).contiguous(memory_format=memory_format)  # [B, C, H, W]
            t = t.to(device=device, dtype=x0.dtype)  # [B]
            loss = F.mse_loss(model(x_t, t, None if labels is None else labels[idx]), eps)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:
                d = _ema_decay(config.ema, step + 1)
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        ema[k].lerp_(v, 1.0 - d)
            value = loss.item()
            recent.append(value)
            log_sum, log_count = log_sum + value, log_count + 1
            done = step + 1
            train_seconds = seconds_before + time.perf_counter() - loop_start
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            bar.update(1)
            if done % config.log_every == 0 or done == config.steps:
                line = {"step": done, "loss": log_sum / log_count, "seconds": round(train_seconds, 3)}
                with log_path.open("a") as f:
                    f.write(json.dumps(line) + "\n")
                log_sum, log_count = 0.0, 0
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps:
                checkpoint(done)

    # 3. Summary.
    wall = time.perf_counter() - wall_start
    iterations = config.steps - start
    summary = {
        "arch": config.arch,
        "steps": config.steps,
        "resumed_from_step": start if saved is not None else None,
        "iterations_this_call": iterations,
        "final_loss": float(np.mean(recent)) if recent else None,
        "final_loss_window": len(recent),
        "wall_seconds": round(wall, 3),
        "train_seconds": round(train_seconds, 3),
        "iterations_per_second": round(iterations / max(time.perf_counter() - loop_start, 1e-9), 3),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "checkpoint": str(ckpt_path),
        "checkpoint_mb": round(ckpt_path.stat().st_size / 2**20, 3),
        "ema": config.ema,
    }
    _write_json(out / SUMMARY_FILE, summary)
    return summary
