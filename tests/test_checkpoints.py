"""Checkpoint files: round trip, weights-only loading, atomic writes and clear errors."""

import os
import pickle

import pytest
import torch

from patchmosaic.checkpoints import (
    CHECKPOINT_FILE,
    CHECKSUM_KEY,
    FORMAT_VERSION,
    atomic_write,
    load_checkpoint,
    load_denoiser,
    save_checkpoint,
    tensor_sha256,
)
from patchmosaic.denoisers import EpsDenoiser
from patchmosaic.models import ResNetConfig, UNetConfig, build_model, config_to_dict

CFG = ResNetConfig(image_size=8, width=8, depth=2, num_classes=3, padding_mode="circular")





def make_checkpoint(path, *, ema=True, config=CFG):
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    label = torch.tensor([0, 1]) if config.num_classes else None
    model(torch.randn(2, 1, 8, 8), torch.rand(2), label).pow(2).mean().backward()
    optimizer.step()
    ema_state = {k: v + 1.0 for k, v in model.state_dict().items()} if ema else None
    save_checkpoint(
        path, model, config, ema=ema_state, optimizer=optimizer, step=7,
        extra={"note": "hi"}, train_config={"seed": 0},
    )
    return model, ema_state


def rewrite(path, **changes):
    """Load the raw checkpoint dict, apply changes (None deletes), save it again.

    The tensor checksum is recomputed, so the checks behind it are reached
    (tests/test_integrity.py covers the checksum itself).
    """
    data = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    if CHECKSUM_KEY in data:
        data[CHECKSUM_KEY] = tensor_sha256(data)
    torch.save(data, path)


def test_round_trip_with_ema(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    model, ema = make_checkpoint(path)
    torch.load(path, weights_only=True)  # loadable without unpickling arbitrary objects
    loaded, config, meta = load_checkpoint(path)
    assert config == CFG and not loaded.training
    for k, v in loaded.state_dict().items():  # sampling weights are the EMA weights
        assert torch.equal(v, ema[k])
    for k, v in model.state_dict().items():
        assert torch.equal(meta["raw_state_dict"][k], v)
    assert meta["step"] == 7 and meta["extra"] == {"note": "hi"} and meta["train_config"] == {"seed": 0}
    assert meta["format_version"] == FORMAT_VERSION and "state" in meta["optimizer"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]  # no temp files left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would create it, not mkstemp's 0600


def test_round_trip_without_ema_and_load_denoiser(tmp_path):
    config = UNetConfig(image_size=8, base_width=8, channel_mults=(1, 2), blocks_per_level=1)
    model, _ = make_checkpoint(tmp_path / CHECKPOINT_FILE, ema=False, config=config)
    loaded, loaded_config, meta = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert loaded_config == config and "raw_state_dict" not in meta
    denoiser = load_denoiser(tmp_path)  # a directory holding model.pt
    assert isinstance(denoiser, EpsDenoiser)
    x = torch.randn(2, 1, 8, 8)
    nchw, _, _ = load_checkpoint(tmp_path, channels_last=False)
    torch.testing.assert_close(EpsDenoiser(nchw)(x, 0.5), EpsDenoiser(model.eval())(x, 0.5), rtol=0, atol=0)
    # by default the network runs channels-last: the same arithmetic in another order
    torch.testing.assert_close(denoiser(x, 0.5), EpsDenoiser(model)(x, 0.5), rtol=1e-4, atol=1e-5)
    assert denoiser.model.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
    assert denoiser(x, 0.5).is_contiguous()
    model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(denoiser(x, 0.5), EpsDenoiser(model)(x, 0.5), rtol=0, atol=0)


def test_attention_unet_round_trip_and_checkpoints_from_before_the_option(tmp_path):
    config = UNetConfig(image_size=8, base_width=8, channel_mults=(1, 2), blocks_per_level=1, attention=True,
                        attention_heads=2)
    model, _ = make_checkpoint(tmp_path / CHECKPOINT_FILE, ema=False, config=config)
    assert model.mid_attention.proj.weight.abs().sum() > 0  # one optimizer step moved the zero-initialised projection
    loaded, loaded_config, _ = load_checkpoint(tmp_path, channels_last=False)
    assert loaded_config == config and loaded.mid_attention is not None
    x, t = torch.randn(2, 1, 8, 8), torch.rand(2)
    torch.testing.assert_close(loaded(x, t), model.eval()(x, t), rtol=0, atol=0)

    # A UNet checkpoint written before attention existed: no attention keys in its model_config.
    plain = UNetConfig(image_size=8, base_width=8, channel_mults=(1, 2), blocks_per_level=1)
    old_path = tmp_path / "old.pt"
    make_checkpoint(old_path, ema=False, config=plain)
    old_config = {k: v for k, v in config_to_dict(plain).items() if not k.startswith("attention")}
    rewrite(old_path, model_config=old_config)
    loaded, loaded_config, _ = load_checkpoint(old_path)
    assert loaded_config == plain and loaded_config.attention is False and loaded.mid_attention is None

    # Attention weights under a config without attention are refused by name.
    rewrite(tmp_path / CHECKPOINT_FILE, model_config=old_config)
    with pytest.raises(ValueError, match=r"unexpected keys \['mid_attention\.norm\.bias'"):
        load_checkpoint(tmp_path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match=CHECKPOINT_FILE):
        load_denoiser(tmp_path)


def test_random_bytes_and_truncated_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*junk\.pt"):
        load_checkpoint(junk)
    good = tmp_path / "good.pt"
    make_checkpoint(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*truncated\.pt"):
        load_checkpoint(truncated)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_checkpoint(empty)


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_objects_are_not_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Evil()}, path)
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_checkpoint(path)
    assert "unpickled!" not in capsys.readouterr().out
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ValueError, match="corrupt checkpoint"):
        load_checkpoint(plain)


def test_mismatched_contents(tmp_path):
    path = tmp_path / CHECKPOINT_FILE
    make_checkpoint(path)
    data = torch.load(path, weights_only=True)

    deeper = config_to_dict(ResNetConfig(image_size=8, width=8, depth=3, num_classes=3, padding_mode="circular"))
    rewrite(path, model_config=deeper)
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.2\.conv1\.bias'"):
        load_checkpoint(path)

    state = dict(data["state_dict"], extra_weight=torch.zeros(1))
    rewrite(path, model_config=data["model_config"], state_dict=state)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra_weight'\]"):
        load_checkpoint(path)

    wider = config_to_dict(ResNetConfig(image_size=8, width=16, depth=2, num_classes=3, padding_mode="circular"))
    rewrite(path, model_config=wider, state_dict=data["state_dict"])
    with pytest.raises(ValueError, match=r"shape mismatch .*conv_in\.weight: \(8, 1, 3, 3\) vs \(16, 1, 3, 3\)"):
        load_checkpoint(path)

    rewrite(path, model_config=data["model_config"], format_version=99)
    with pytest.raises(ValueError, match="format_version 99"):
        load_checkpoint(path)

    rewrite(path, format_version=1, arch="transformer")
    with pytest.raises(ValueError, match="unknown arch 'transformer'"):
        load_checkpoint(path)

    rewrite(path, arch="resnet", state_dict=None)
    with pytest.raises(ValueError, match=r"lacks the entries \['state_dict'\]"):
        load_checkpoint(path)

    torch.save([1, 2], path)
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        load_checkpoint(path)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"partial")
            raise RuntimeError("crash while writing")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]
    with atomic_write(path) as f:
        f.write(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]
