"""Every command: usage errors exit 2, runtime errors exit 1, and a failure leaves no new --out behind.

Convention: a bad flag or value (including a non-empty --out without --overwrite, a
seed list that is too large) is a usage error, exit status 2 (click.UsageError /
BadParameter), raised before any output directory is created; an error found while
working (an unreadable file, a corrupt checkpoint) is a runtime error, exit status 1
(click.ClickException). Either way the user's files are untouched and no empty or
half-written --out is left behind.
"""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import patchmosaic
from patchmosaic.samplers import SAMPLERS
from patchmosaic.cli import main
from patchmosaic.runs import undo_new_dir_on_failure

H = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny dataset, a checkpoint trained (per its config) on it, a provenance run and a corrupt file."""
    from patchmosaic.checkpoints import save_checkpoint
    from patchmosaic.models import ResNetConfig, build_model
    from patchmosaic.training import TrainConfig

    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    data = root / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (6, H, H), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    config = ResNetConfig(in_channels=1, image_size=H, width=4, depth=1, norm_groups=0)
    torch.manual_seed(0)
    model = root / "model"
    model.mkdir()
    train = TrainConfig(dataset=str(data), n_train=5, image_size=None, model=config, steps=1)
    save_checkpoint(model / "model.pt", build_model(config), config, step=1, train_config=train.to_dict())
    patchmosaic.PatchSchedule((3, 5, 3)).save(model / "schedule.json")
    run = root / "prov"
    result = CliRunner().invoke(main, ["sample", "--dataset", str(data), "--size", "native", "--patch-sizes", "3,3",
                                       "--steps", "2", "--seeds", "0-1", "--provenance", "--out", str(run)])
    assert result.exit_code == 0, result.output
    corrupt = root / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not an npz archive")
    broken_run = root / "broken-run"
    broken_run.mkdir()
    (broken_run / "config.json").write_text("{}")
    (broken_run / "samples.npz").write_bytes(corrupt.read_bytes())
    return {"data": data, "model": model, "run": run, "corrupt": corrupt, "broken_run": broken_run}


def sample_args(w, out):
    return ["sample", "--dataset", w["data"], "--size", "native", "--patch-sizes", "3,3", "--steps", "2",
            "--seeds", "0-1", "--out", out]


def calibrate_args(w, out, model=None):
    return ["calibrate", "--model", model or w["model"], "--candidates", "3,5", "--steps", "3", "--seeds", "0",
            "--out", out]


def evaluate_args(w, out, model=None):
    return ["evaluate", "--model", model or w["model"], "--seeds", "0-1", "--bootstrap-resamples", "10",
            "--out", out]


def explain_args(w, out, run=None):
    return ["explain", run or w["run"], "--no-compare-ideal", "--out", out]


def report_args(w, out, run=None):
    return ["report", run or w["run"], "--out", out]


def train_args(w, out, data=None):
    return ["train", "--dataset", data or w["data"], "--size", "8", "--n-train", "6", "--width", "4", "--depth",
            "1", "--norm-groups", "0", "--steps", "1", "--batch-size", "2", "--no-progress", "--out", out]


COMMANDS = {
    "sample": sample_args,
    "calibrate": calibrate_args,
    "evaluate": evaluate_args,
    "explain": explain_args,
    "report": report_args,
    "train": train_args,
}


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


@pytest.mark.parametrize("command", COMMANDS)
def test_non_empty_out_is_a_usage_error_and_untouched(world, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("my results")
    for name in ("config.json", "samples.npz", "index.html", "explain.json", "model.pt"):
        (out / name).write_text("the user's file")
    before = snapshot(out)
    result = invoke(COMMANDS[command](world, out))
    assert result.exit_code == 2, (command, result.output)
    assert "Error:" in result.output and "Traceback" not in result.output
    assert "--out" in result.output or "RUN_DIR" in result.output
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["sample", "calibrate", "evaluate"])
@pytest.mark.parametrize(
    ("seeds", "fragment"),
    [
        ("99999999999999999999", "below 2**63"),
        ("9223372036854775808", "below 2**63"),
        ("0-100000000", "100,000,001 seeds; at most 100,000"),
        ("5-", "cannot parse"),
    ],
)
def test_bad_seeds_are_usage_errors_for_every_command(world, tmp_path, command, seeds, fragment):
    out = tmp_path / "deep" / "out"
    result = invoke(replace(COMMANDS[command](world, out), "--seeds", seeds))
    assert result.exit_code == 2, result.output
    assert "--seeds" in result.output and fragment in result.output, result.output
    assert "Overflow" not in result.output
    assert not (tmp_path / "deep").exists()


def test_largest_seed_works(world, tmp_path):
    out = tmp_path / "out"
    result = invoke(replace(sample_args(world, out), "--seeds", str(2**63 - 1)))
    assert result.exit_code == 0, result.output
    assert patchmosaic.runs.load_samples(out)["seeds"].tolist() == [2**63 - 1]


USAGE_ERRORS = {
    "sample": lambda w, out: replace(sample_args(w, out), "--patch-sizes", "3,4"),
    "calibrate": lambda w, out: replace(calibrate_args(w, out), "--candidates", "4"),
    "evaluate": lambda w, out: [*evaluate_args(w, out), "--patch-sizes", "3,4,5"],
    "explain": lambda w, out: [*explain_args(w, out), "--tolerance", "-1"],
    "report": lambda w, out: [*report_args(w, out), "--overwrite", "--overwrite=maybe"],
    "train": lambda w, out: [*train_args(w, out), "--resume"],
}
RUNTIME_ERRORS = {
    "sample": lambda w, out: replace(sample_args(w, out), "--dataset", w["corrupt"]),
    "calibrate": lambda w, out: calibrate_args(w, out, model=w["corrupt"]),
    "evaluate": lambda w, out: evaluate_args(w, out, model=w["corrupt"]),
    "explain": lambda w, out: explain_args(w, out, run=w["broken_run"]),
    "report": lambda w, out: report_args(w, out, run=w["broken_run"]),
    "train": lambda w, out: train_args(w, out, data=w["corrupt"]),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize(("kind", "status"), [("usage", 2), ("runtime", 1)])
def test_exit_status_and_no_out_left_behind(world, tmp_path, command, kind, status):
    out = tmp_path / "new" / "out"
    args = (USAGE_ERRORS if kind == "usage" else RUNTIME_ERRORS)[command](world, out)
    result = invoke(args)
    assert result.exit_code == status, (command, kind, result.output, result.exception)
    assert "Error:" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "new").exists(), list((tmp_path / "new").rglob("*"))


def test_failure_after_the_out_dir_was_created_removes_it(world, tmp_path, monkeypatch):
    """A crash in the first batch (config.json written, nothing sampled) leaves no --out behind."""

    def crash(*args, **kwargs):
        raise ValueError("the machine broke")

    monkeypatch.setitem(SAMPLERS, "euler", crash)
    out = tmp_path / "a" / "b"
    result = invoke(sample_args(world, out))
    assert result.exit_code == 1 and "the machine broke" in result.output
    assert not (tmp_path / "a").exists()


def test_undo_new_dir_never_touches_an_existing_directory(tmp_path):
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "config.json").write_text("mine")
    with pytest.raises(RuntimeError), undo_new_dir_on_failure(existing, files=("config.json",)):
        raise RuntimeError
    assert (existing / "config.json").read_text() == "mine"

    new = tmp_path / "x" / "y"
    with pytest.raises(RuntimeError), undo_new_dir_on_failure(new, files=("config.json",)):
        new.mkdir(parents=True)
        (new / "config.json").write_text("ours")
        (new / "notes.txt").write_text("not a file of the block")
        raise RuntimeError
    assert (new / "notes.txt").exists() and not (new / "config.json").exists()  # only its own file; dir not empty

    kept = tmp_path / "k"
    with pytest.raises(KeyboardInterrupt), undo_new_dir_on_failure(kept, files=("config.json",), keep_if="model.pt"):
        kept.mkdir()
        (kept / "config.json").write_text("ours")
        (kept / "model.pt").write_text("a resumable checkpoint")
        raise KeyboardInterrupt
    assert (kept / "config.json").exists()

    gone = tmp_path / "g" / "h"
    with pytest.raises(RuntimeError), undo_new_dir_on_failure(gone, files=("config.json",)):
        gone.mkdir(parents=True)
        (gone / "config.json").write_text("ours")
        raise RuntimeError
    assert not (tmp_path / "g").exists()
