"""Pretrained models: name resolution, the label rule, export and publishing (patchmosaic.pretrained)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from patchmosaic import PatchSchedule, noise_for_seeds, sample
from patchmosaic.checkpoints import load_checkpoint, load_denoiser, save_checkpoint
from patchmosaic.cli import main
from patchmosaic.models import ResNetConfig, build_model
from patchmosaic.pretrained import (
    PRETRAINED_ENV,
    available_pretrained,
    export_sampling_checkpoint,
    label_for_seed,
    labels_for_seeds,
    pretrained_root,
    publish_pretrained,
    verify_pretrained,
    resolve_model,
    resolve_schedule_spec,
    training_set,
)
from patchmosaic.training import TrainConfig

H = W = 8


@pytest.fixture
def run_dir(tmp_path):
    """A fake training run directory: model.pt (with optimizer and EMA entries) and config.json."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (6, H, W), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    config = ResNetConfig(in_channels=1, image_size=H, width=4, depth=1, norm_groups=0, num_classes=3)
    torch.manual_seed(0)
    model = build_model(config)
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}  # sampling weights differ from the raw ones
    optimizer = torch.optim.AdamW(model.parameters())
    train = TrainConfig(dataset=str(data), n_train=6, image_size=None, conditional=True, model=config, steps=3)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "model.pt", model, config, ema=ema, optimizer=optimizer, step=3,
                    train_config=train.to_dict(), extra={"train_seconds": 1.5})
    (run / "config.json").write_text(json.dumps({"train": train.to_dict()}))
    return run


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A temporary pretrained root via $PATCHMOSAIC_PRETRAINED_DIR."""
    path = tmp_path / "pretrained"
    path.mkdir()
    monkeypatch.setenv(PRETRAINED_ENV, str(path))
    return path


def publish(run_dir, tmp_path, name="tiny-cond", schedule=(3, 5)):
    sched = tmp_path / f"schedule-{name}.json"
    PatchSchedule(schedule).save(sched)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"aggregates": {"els": {"pearson_r": {"median": 0.5}}}}))
    return publish_pretrained(name, run_dir, schedule=sched, metrics=metrics)


def test_label_rule():
    assert [label_for_seed(s, 10) for s in (0, 3, 10, 27)] == [0, 3, 0, 7]
    assert label_for_seed(5, 0) is None
    assert labels_for_seeds([0, 1, 2, 3, 4], 3) == [0, 1, 2, 0, 1]
    assert labels_for_seeds([0, 1], 0) is None
    with pytest.raises(ValueError, match="non-negative"):
        label_for_seed(-1, 10)


def test_root_override_and_package_default(root, monkeypatch):
    assert pretrained_root() == root and available_pretrained() == []
    monkeypatch.delenv(PRETRAINED_ENV)
    assert pretrained_root().name == "pretrained" and pretrained_root().parent.name == "patchmosaic"


def test_export_is_sampling_only_and_equivalent(run_dir, tmp_path):
    dst = export_sampling_checkpoint(run_dir, tmp_path / "export.pt")
    data = torch.load(dst, weights_only=True)
    assert "optimizer" not in data and "raw_state_dict" not in data
    assert data["step"] == 3 and data["train_config"]["n_train"] == 6
    assert dst.stat().st_size < (run_dir / "model.pt").stat().st_size
    model, _, _ = load_checkpoint(run_dir)
    exported, config, _ = load_checkpoint(dst)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[k], v, rtol=0, atol=0)
    noise = noise_for_seeds([0, 1], (1, H, W))
    label = torch.tensor([0, 1])
    a = sample(load_denoiser(run_dir), noise, steps=2, label=label)
    b = sample(load_denoiser(dst), noise, steps=2, label=label)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    ts = training_set(config, data["train_config"])
    assert (ts.n_train, ts.padding, ts.num_classes, ts.image_size) == (6, "zeros", 3, None)
    assert ts.load().images.shape == (6, 1, H, W)


def test_publish_and_resolve_names(run_dir, root, tmp_path):
    dest = publish(run_dir, tmp_path)
    assert dest == root / "tiny-cond"
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "metrics.json", "model.pt", "schedule.json"]
    assert available_pretrained() == ["tiny-cond"]
    for spec in ("pretrained:tiny-cond", "tiny-cond"):
        src = resolve_model(spec)
        assert src.checkpoint == dest / "model.pt" and src.name == "tiny-cond"
        assert src.describe() == "pretrained:tiny-cond"
    # paths still resolve, and take precedence
    assert resolve_model(str(run_dir)).checkpoint == run_dir / "model.pt"
    assert resolve_model(str(run_dir / "model.pt")).name is None
    # schedules
    assert resolve_schedule_spec("pretrained:tiny-cond") == str(dest / "schedule.json")
    assert PatchSchedule.parse(resolve_schedule_spec("pretrained:tiny-cond")).sizes == (3, 5)
    assert resolve_schedule_spec("mnist-resnet-zeros") == "mnist-resnet-zeros"  # bare names stay paper presets
    with pytest.raises(FileExistsError, match="overwrite"):
        publish(run_dir, tmp_path)


def test_unknown_names_list_the_available(run_dir, root, tmp_path):
    publish(run_dir, tmp_path, name="alpha")
    publish(run_dir, tmp_path, name="beta")
    with pytest.raises(FileNotFoundError, match="unknown pretrained model 'gamma'.*available: alpha, beta"):
        resolve_model("pretrained:gamma")
    with pytest.raises(FileNotFoundError, match="pretrained name.*alpha, beta"):
        resolve_model("gamma")
    with pytest.raises(FileNotFoundError, match="available: alpha, beta"):
        resolve_schedule_spec("pretrained:gamma")


def test_missing_schedule_is_a_clear_error(run_dir, root, tmp_path):
    dest = publish(run_dir, tmp_path)
    (dest / "schedule.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no schedule.json.*patchmosaic calibrate"):
        resolve_schedule_spec("pretrained:tiny-cond")
    result = CliRunner().invoke(main, ["sample", "--like", "pretrained:tiny-cond", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "has no schedule.json" in result.output


def test_pretrained_command_lists_and_publishes(run_dir, root, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["pretrained"])
    assert result.exit_code == 0 and "no pretrained models" in result.output
    sched = tmp_path / "s.json"
    PatchSchedule((3, 5)).save(sched)
    result = runner.invoke(main, ["pretrained", "publish", "tiny", "--run", str(run_dir), "--schedule", str(sched)])
    assert result.exit_code == 0, result.output
    for args in (["pretrained"], ["pretrained", "list"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        assert "tiny | resnet on" in result.output and "n_train=6" in result.output
        assert "3-class conditional" in result.output and "schedule 3,5" in result.output
    result = runner.invoke(main, ["pretrained", "publish", "Bad Name", "--run", str(run_dir), "--schedule", str(sched)])
    assert result.exit_code != 0 and "lower-case" in result.output


def test_publish_adds_a_leaderboard_to_an_existing_model_only_with_overwrite(run_dir, root, tmp_path):
    dest = publish(run_dir, tmp_path)
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    board = tmp_path / "cmp" / "leaderboard.json"
    board.parent.mkdir()
    board.write_text(json.dumps({"leaderboard": [{"name": "els"}]}))
    runner = CliRunner()
    refused = runner.invoke(main, ["pretrained", "publish", "tiny-cond", "--leaderboard", str(board.parent)])
    assert refused.exit_code != 0 and "replaces its leaderboard.json; pass overwrite" in refused.output
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    done = runner.invoke(main, ["pretrained", "publish", "tiny-cond", "--leaderboard", str(board.parent), "--overwrite"])
    assert done.exit_code == 0, done.output
    after = {p.name: p.read_bytes() for p in dest.iterdir()}
    assert after == {**before, "leaderboard.json": board.read_bytes()}  # the other files untouched
    manifest = json.loads((root / "MANIFEST.json").read_text())["files"]
    assert "tiny-cond/leaderboard.json" in manifest
    verify_pretrained("tiny-cond")
    (dest / "leaderboard.json").write_text("{}")  # tampered: the manifest names it
    with pytest.raises(ValueError, match="leaderboard.json"):
        verify_pretrained("tiny-cond")
    # nothing to add, or no such model
    nothing = runner.invoke(main, ["pretrained", "publish", "tiny-cond", "--overwrite"])
    assert nothing.exit_code != 0 and "nothing to publish" in nothing.output
    missing = runner.invoke(main, ["pretrained", "publish", "other", "--leaderboard", str(board), "--overwrite"])
    assert missing.exit_code != 0 and "cannot update 'other'" in missing.output
    no_schedule = runner.invoke(main, ["pretrained", "publish", "new", "--run", str(run_dir)])
    assert no_schedule.exit_code != 0 and "needs its schedule.json" in no_schedule.output


def test_checkpoint_without_train_config_names_no_training_set(tmp_path):
    config = ResNetConfig(in_channels=1, image_size=H, width=4, depth=1, norm_groups=0)
    save_checkpoint(tmp_path / "model.pt", build_model(config), config, step=0)
    result = CliRunner().invoke(main, ["evaluate", "--model", str(tmp_path), "--patch-sizes", "3,3",
                                       "--out", str(tmp_path / "e")])
    assert result.exit_code != 0 and "has no train_config" in result.output
