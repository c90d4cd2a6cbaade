"""Damaged checkpoints and pretrained files are refused by name, never loaded silently."""

import json
import shutil
import struct

import pytest
import torch
from click.testing import CliRunner

from patchmosaic.checkpoints import CHECKSUM_KEY, load_checkpoint, save_checkpoint, tensor_sha256
from patchmosaic.cli import main
from patchmosaic.models import ResNetConfig, build_model
from patchmosaic.pretrained import (
    MANIFEST_FILE,
    PRETRAINED_ENV,
    available_pretrained,
    pretrained_root,
    resolve_model,
    verify_pretrained,
)

PACKAGE_ROOT = pretrained_root()


def corrupt(path, start=200_000, stop=200_400):
    """Overwrite bytes [start, stop) with float32 0.5 values (the fault of the issue)."""
    data = bytearray(path.read_bytes())
    data[start:stop] = struct.pack("<f", 0.5) * ((stop - start) // 4)
    path.write_bytes(bytes(data))


def test_corrupted_pretrained_copy_is_refused_by_sample(tmp_path, monkeypatch):
    monkeypatch.delenv(PRETRAINED_ENV, raising=False)
    copy = tmp_path / "model.pt"
    shutil.copyfile(PACKAGE_ROOT / "mnist-resnet-zeros" / "model.pt", copy)
    load_checkpoint(copy)  # intact: loads
    corrupt(copy)
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["sample", "--model", str(copy), "--seeds", "0-7", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert f"corrupt checkpoint {copy}" in result.output and "sha256" in result.output
    assert not out.exists()


def test_package_manifest_lists_and_matches_every_pretrained_file(monkeypatch):
    monkeypatch.delenv(PRETRAINED_ENV, raising=False)
    manifest = json.loads((PACKAGE_ROOT / MANIFEST_FILE).read_text())["files"]
    names = available_pretrained(PACKAGE_ROOT)
    assert names == ["fashion-resnet-zeros-cond", "fashion-unet-zeros-cond", "mnist-resnet-circular", "mnist-resnet-zeros",
                     "mnist-unet-attention", "mnist-unet-zeros"]
    for name in names:
        verify_pretrained(name)
        for f in ("model.pt", "config.json", "schedule.json", "metrics.json"):
            assert f"{name}/{f}" in manifest
        data = torch.load(PACKAGE_ROOT / name / "model.pt", weights_only=True)
        assert data["format_version"] == 2 and data[CHECKSUM_KEY] == tensor_sha256(data)


@pytest.mark.parametrize("damaged", ["model.pt", "schedule.json", "metrics.json"])
def test_damaged_pretrained_file_is_named(tmp_path, monkeypatch, damaged):
    root = tmp_path / "pre"
    shutil.copytree(PACKAGE_ROOT, root)
    monkeypatch.setenv(PRETRAINED_ENV, str(root))
    resolve_model("pretrained:mnist-resnet-zeros")  # intact copy: fine
    path = root / "mnist-resnet-zeros" / damaged
    data = bytearray(path.read_bytes())
    data[-10] ^= 1  # one flipped bit
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}.*damaged or modified"):
        resolve_model("pretrained:mnist-resnet-zeros")
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["sample", "--model", "pretrained:mnist-resnet-zeros", "--seeds", "0",
                                       "--out", str(out)])
    assert result.exit_code == 1 and damaged in result.output and "damaged or modified" in result.output
    assert not out.exists()


def test_unlisted_file_and_broken_manifest(tmp_path, monkeypatch):
    root = tmp_path / "pre"
    shutil.copytree(PACKAGE_ROOT, root)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    del manifest["files"]["mnist-resnet-zeros/config.json"]
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="config.json is not listed in"):
        verify_pretrained("mnist-resnet-zeros", root)
    (root / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="manifest .* is unreadable"):
        verify_pretrained("mnist-resnet-zeros", root)


def tiny_checkpoint(path, **kwargs):
    config = ResNetConfig(in_channels=1, image_size=8, width=4, depth=1, norm_groups=0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 1, 8, 8), torch.zeros(1)).sum().backward()
    optimizer.step()
    save_checkpoint(path, model, config, optimizer=optimizer, step=1, **kwargs)
    return path


def test_any_changed_tensor_is_detected(tmp_path):
    path = tiny_checkpoint(tmp_path / "m.pt")
    load_checkpoint(path)
    data = torch.load(path, weights_only=True)
    state = next(iter(data["optimizer"]["state"].values()))
    state["exp_avg"].view(-1)[0] += 1e-6  # optimizer state counts too (a resumed run uses it)
    torch.save(data, path)
    with pytest.raises(ValueError, match="corrupt checkpoint .*sha256"):
        load_checkpoint(path)


def test_format_1_checkpoint_without_checksum_still_loads(tmp_path):
    path = tiny_checkpoint(tmp_path / "m.pt")
    data = torch.load(path, weights_only=True)
    del data[CHECKSUM_KEY]
    data["format_version"] = 1
    torch.save(data, path)
    model, _, meta = load_checkpoint(path)
    assert meta["format_version"] == 1 and CHECKSUM_KEY not in meta
    data["format_version"] = 2  # a format 2 file without its checksum is refused
    torch.save(data, path)
    with pytest.raises(ValueError, match="records None"):
        load_checkpoint(path)
