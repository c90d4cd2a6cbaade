"""Training loop (patchmosaic.training) and the ``train`` command, on a tiny .npz set."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from patchmosaic.checkpoints import CHECKPOINT_FILE, load_checkpoint, load_denoiser
from patchmosaic.cli.train import train as train_command
from patchmosaic.models import ResNetConfig, UNetConfig
from patchmosaic.training import LOG_FILE, SUMMARY_FILE, EpochSampler, TrainConfig, train

TINY_RESNET = ResNetConfig(width=8, depth=2, norm_groups=4)




@pytest.fixture
def tiny(tmp_path):
    """12 labelled 8x8 grayscale blobs (classes 0, 1, 2) as an .npz dataset."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    images = []
    for i in range(12):
        cy, cx = rng.uniform(2, 6, size=2)
        images.append(255 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0))
    path = tmp_path / "tiny.npz"
    np.savez(path, images=np.asarray(images).astype(np.uint8), labels=np.arange(12) % 3)
    return path


def config(dataset, **kw):
    defaults = dict(
        dataset=str(dataset), n_train=None, image_size=None, model=TINY_RESNET, steps=6, batch_size=4,
        lr=2e-3, ema=0.9, checkpoint_every=3, log_every=1, threads=1,
    )
    return TrainConfig(**{**defaults, **kw})


def weights(path):
    _, _, meta = load_checkpoint(path / CHECKPOINT_FILE)
    data = torch.load(path / CHECKPOINT_FILE, weights_only=True)
    return data["state_dict"], data.get("raw_state_dict"), meta


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def log_losses(run):
    return [json.loads(line)["loss"] for line in (run / LOG_FILE).read_text().splitlines()]


def test_loss_decreases(tiny, tmp_path):
    run = tmp_path / "run"
    summary = train(config(tiny, steps=60, batch_size=8, ema=0.0, checkpoint_every=0), run, progress=False)
    losses = log_losses(run)
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert summary["final_loss"] == pytest.approx(np.mean(losses))  # fewer than 100 iterations: all of them
    assert summary["steps"] == 60 and summary["num_parameters"] > 0 and summary["checkpoint_mb"] > 0
    assert json.loads((run / SUMMARY_FILE).read_text()) == summary
    written = json.loads((run / "config.json").read_text())
    assert written["train"]["model"]["in_channels"] == 1 and written["train"]["model"]["image_size"] == 8
    assert written["train"]["model"]["num_classes"] == 0 and written["n_images"] == 12


def test_same_config_same_weights(tiny, tmp_path):
    train(config(tiny, steps=4), tmp_path / "a", progress=False)
    train(config(tiny, steps=4), tmp_path / "b", progress=False)
    train(config(tiny, steps=4, seed=1), tmp_path / "c", progress=False)
    a, raw_a, _ = weights(tmp_path / "a")
    b, raw_b, _ = weights(tmp_path / "b")
    c, _, _ = weights(tmp_path / "c")
    assert_same_state(a, b)
    assert_same_state(raw_a, raw_b)
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])
    assert not torch.equal(a["conv_in.weight"], raw_a["conv_in.weight"])  # EMA differs from the raw weights


@pytest.mark.parametrize("conditional", [False, True])
def test_resume_matches_uninterrupted_run(tiny, tmp_path, conditional):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(config(tiny, steps=6, conditional=conditional), whole, progress=False)
    train(config(tiny, steps=3, conditional=conditional), part, progress=False)
    summary = train(config(tiny, steps=6, conditional=conditional), part, resume=True, progress=False)
    w, raw_w, meta_w = weights(whole)
    p, raw_p, meta_p = weights(part)
    assert_same_state(w, p)
    assert_same_state(raw_w, raw_p)
    assert meta_p["step"] == 6 and summary["resumed_from_step"] == 3 and summary["iterations_this_call"] == 3
    assert meta_w["extra"]["recent_losses"] == meta_p["extra"]["recent_losses"]
    assert log_losses(whole) == log_losses(part)
    assert summary["final_loss"] == pytest.approx(np.mean(log_losses(whole)))


def test_resume_after_a_crash_discards_later_log_lines(tiny, tmp_path):
    run = tmp_path / "run"
    train(config(tiny, steps=3, ema=0.0), run, progress=False)
    with (run / LOG_FILE).open("a") as f:  # a crashed run logged past its last checkpoint
        f.write(json.dumps({"step": 4, "loss": 123.0, "seconds": 0.0}) + "\n")
    train(config(tiny, steps=5, ema=0.0), run, resume=True, progress=False)
    assert [json.loads(line)["step"] for line in (run / LOG_FILE).read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert 123.0 not in log_losses(run)


def test_existing_checkpoint_and_resume_errors(tiny, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(config(tiny, steps=2), run, resume=True, progress=False)
    train(config(tiny, steps=2), run, progress=False)
    before = (run / CHECKPOINT_FILE).read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        train(config(tiny, steps=2), run, progress=False)
    with pytest.raises(ValueError, match=r"lr: 0\.002 -> 0\.001"):
        train(config(tiny, steps=4, lr=1e-3), run, resume=True, progress=False)
    with pytest.raises(ValueError, match="beyond steps=1"):
        train(config(tiny, steps=1), run, resume=True, progress=False)
    assert (run / CHECKPOINT_FILE).read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_conditional_needs_labels(tmp_path):
    path = tmp_path / "unlabelled.npz"
    np.savez(path, images=np.zeros((4, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="has no labels"):
        train(config(path, conditional=True), tmp_path / "run", progress=False)


def test_unet_conditional_run_samples(tiny, tmp_path):
    unet = UNetConfig(base_width=8, channel_mults=(1, 2), blocks_per_level=1, norm_groups=4)
    train(config(tiny, model=unet, steps=2, conditional=True), tmp_path / "run", progress=False)
    denoiser = load_denoiser(tmp_path / "run")
    assert denoiser.model.config.num_classes == 3
    assert denoiser.bind(label=2)(torch.randn(2, 1, 8, 8), 0.5).shape == (2, 1, 8, 8)


def test_unet_run_saved_before_attention_existed_resumes(tiny, tmp_path):
    """A UNet checkpoint whose configs lack the attention fields resumes as attention=False."""
    from patchmosaic.checkpoints import CHECKSUM_KEY, tensor_sha256

    unet = UNetConfig(base_width=8, channel_mults=(1, 2), blocks_per_level=1, norm_groups=4)
    run = tmp_path / "run"
    train(config(tiny, model=unet, steps=2, ema=0.0), run, progress=False)
    data = torch.load(run / CHECKPOINT_FILE, weights_only=True)
    for model_config in (data["model_config"], data["train_config"]["model"]):
        for key in ("attention", "attention_heads"):
            del model_config[key]
    data[CHECKSUM_KEY] = tensor_sha256(data)
    torch.save(data, run / CHECKPOINT_FILE)
    summary = train(config(tiny, model=unet, steps=3, ema=0.0), run, resume=True, progress=False)
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 3
    with pytest.raises(ValueError, match="model.attention: False -> True"):
        train(config(tiny, model=dataclasses.replace(unet, attention=True), steps=4, ema=0.0), run, resume=True,
              progress=False)


def test_cli_unet_with_attention(tiny, tmp_path):
    out = tmp_path / "att"
    plain = [
        "--dataset", str(tiny), "--size", "8", "--n-train", "8", "--arch", "unet", "--width", "8",
        "--channel-mults", "1,2", "--blocks-per-level", "1", "--norm-groups", "4", "--steps", "3",
        "--batch-size", "4", "--out", str(out), "--threads", "1", "--no-progress",
    ]
    result = CliRunner().invoke(train_command, [*plain, "--attention", "--attention-heads", "2"])
    assert result.exit_code == 0, result.output
    assert "trained steps 1-3 in" in result.output
    model, cfg, _ = load_checkpoint(out)
    assert cfg.attention is True and cfg.attention_heads == 2 and model.mid_attention.heads == 2
    assert json.loads((out / "config.json").read_text())["train"]["model"]["attention"] is True
    changed = CliRunner().invoke(train_command, [*plain, "--steps", "4", "--resume"])
    assert changed.exit_code == 2 and "--attention on in the run, off now" in changed.output, changed.output

    for extra, flag in ((["--attention"], "--attention"), (["--attention-heads", "2"], "--attention-heads")):
        bad = CliRunner().invoke(train_command, ["--dataset", str(tiny), "--arch", "resnet", *extra,
                                                 "--out", str(tmp_path / "r")])
        assert bad.exit_code == 2, bad.output
        assert f"Invalid value for '{flag}': {flag} applies to --arch unet only" in bad.output
        assert "Traceback" not in bad.output
    alone = CliRunner().invoke(train_command, ["--dataset", str(tiny), "--arch", "unet", "--attention-heads", "2",
                                               "--out", str(tmp_path / "u")])
    assert alone.exit_code == 2 and "--attention-heads applies with --attention only" in alone.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "u").exists()
    assert "--attention" in CliRunner().invoke(train_command, ["--help"]).output


def test_epoch_sampler_visits_every_image_once_per_epoch():
    sampler = EpochSampler(n=10, batch_size=4, seed=3)
    stream = torch.cat([sampler.indices(s) for s in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10)) and sorted(stream[10:].tolist()) == list(range(10))
    assert torch.equal(EpochSampler(10, 4, 3).indices(3), sampler.indices(3))  # stateless


@pytest.mark.parametrize("arch", [TINY_RESNET, UNetConfig(base_width=8, channel_mults=(1, 2), norm_groups=4)])
def test_channels_last_changes_rounding_only(tiny, tmp_path, arch):
    # the same arithmetic in another memory order: equal weights up to float32 rounding, contiguous on disk
    train(config(tiny, model=arch, steps=4), tmp_path / "nhwc", progress=False)
    train(config(tiny, model=arch, steps=4, channels_last=False), tmp_path / "nchw", progress=False)
    a, raw_a, _ = weights(tmp_path / "nhwc")
    b, raw_b, _ = weights(tmp_path / "nchw")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(raw_a[k], raw_b[k], rtol=1e-4, atol=1e-5, msg=k)
        assert a[k].is_contiguous() and raw_a[k].is_contiguous(), k
    np.testing.assert_allclose(log_losses(tmp_path / "nhwc"), log_losses(tmp_path / "nchw"), rtol=1e-4)


def test_resume_may_switch_channels_last(tiny, tmp_path):
    run = tmp_path / "run"
    train(config(tiny, steps=3, channels_last=False), run, progress=False)
    summary = train(config(tiny, steps=6), run, resume=True, progress=False)
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    with pytest.raises(ValueError, match="channels_last"):
        TrainConfig(channels_last=1)


def test_config_round_trip_and_validation():
    cfg = TrainConfig(model=UNetConfig(channel_mults=(1, 2)), conditional=True, threads=2)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.arch == "unet"
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(ema=1.0)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="unknown training config"):
        TrainConfig.from_dict({"stpes": 3})


def test_cli(tiny, tmp_path):
    out = tmp_path / "cli"
    args = [
        "--dataset", str(tiny), "--size", "8", "--n-train", "8", "--width", "8", "--depth", "1",
        "--norm-groups", "4", "--steps", "3", "--batch-size", "4", "--checkpoint-every", "2",
        "--out", str(out), "--threads", "1", "--no-progress",
    ]
    result = CliRunner().invoke(train_command, args)
    assert result.exit_code == 0, result.output
    assert "trained steps 1-3 in" in result.output
    assert {CHECKPOINT_FILE, "config.json", LOG_FILE, SUMMARY_FILE} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["train"]["threads"] == 1

    again = CliRunner().invoke(train_command, args)
    assert again.exit_code == 2 and "Error:" in again.output and "pass --resume to continue it" in again.output
    assert "Traceback" not in again.output

    assert json.loads((out / "config.json").read_text())["train"]["channels_last"] is True

    resumed = CliRunner().invoke(train_command, [*args, "--steps", "4", "--resume", "--no-channels-last"])
    assert resumed.exit_code == 0, resumed.output  # the last --steps wins; the memory format may change
    assert json.loads((out / "config.json").read_text())["train"]["channels_last"] is False
    assert "trained steps 4-4 (resumed from step 3)" in resumed.output
    assert json.loads((out / SUMMARY_FILE).read_text())["resumed_from_step"] == 3
    changed = CliRunner().invoke(train_command, [*args, "--steps", "5", "--lr", "0.01", "--width", "4",
                                                 "--resume"])
    assert changed.exit_code == 2, changed.output
    assert "resume=True" not in changed.output and "model.width" not in changed.output
    assert "--lr 0.0002 in the run, 0.01 now" in changed.output
    assert "--width 8 in the run, 4 now" in changed.output

    bad = CliRunner().invoke(train_command, ["--dataset", str(tiny), "--arch", "unet", "--depth", "3", "--out", "x"])
    assert bad.exit_code != 0 and "--depth applies to --arch resnet only" in bad.output
    nope = ["--dataset", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "m")]
    missing = CliRunner().invoke(train_command, nope)
    assert missing.exit_code != 0 and "Error:" in missing.output and "not found" in missing.output
    assert "--padding" in CliRunner().invoke(train_command, ["--help"]).output
