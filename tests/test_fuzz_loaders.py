"""Malformed files fed to every loader: a clear ValueError naming the file, or a correct load.

Seeded mutations (truncation, flipped and overwritten bytes, random bytes, empty
files, appended garbage; for JSON also type-confused values) of valid npz, IDX,
CIFAR-10 batch, checkpoint, samples, provenance and JSON files. No loader may
fail with another exception type (a traceback for the user).
"""

import gzip
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from patchmosaic.checkpoints import load_checkpoint, save_checkpoint
from patchmosaic.data.formats import read_cifar10, read_idx, read_npz
from patchmosaic.models import ResNetConfig, build_model
from patchmosaic.runs import load_provenance
from patchmosaic.report import build_report
from patchmosaic.runs import load_samples
from patchmosaic.schedules import PatchSchedule

CASES = 40  # mutations per file kind


def mutations(data: bytes, rng: np.random.Generator, n: int = CASES):
    """``n`` seeded malformed variants of ``data``."""
    yield b""
    yield data[: len(data) // 2]
    yield data + b"\x00garbage"
    for _ in range(n - 3):
        kind = rng.integers(4)
        buf = bytearray(data)
        if kind == 0:  # truncate anywhere
            buf = buf[: int(rng.integers(0, len(buf)))]
        elif kind == 1:  # flip a few bits
            for pos in rng.integers(0, len(buf), size=int(rng.integers(1, 6))):
                buf[pos] ^= 1 << int(rng.integers(8))
        elif kind == 2:  # overwrite a run with float32 0.5 / random bytes
            start = int(rng.integers(0, len(buf)))
            chunk = struct.pack("<f", 0.5) * 8 if rng.random() < 0.5 else rng.bytes(32)
            buf[start : start + len(chunk)] = chunk
        else:  # random bytes of a similar length
            buf = bytearray(rng.bytes(int(rng.integers(1, len(data) + 1))))
        yield bytes(buf)


def check(load, path: Path, mutated: bytes):
    """``load(path)`` either succeeds or raises ValueError mentioning the file."""
    path.write_bytes(mutated)
    try:
        load()
    except ValueError as err:
        assert path.name in str(err) or str(path.parent) in str(err), f"{err!r} does not name {path}"
    except Exception as err:  # noqa: BLE001 - the point of the test
        pytest.fail(f"{type(err).__name__} (not a clear ValueError) from {path.name} mutated to "
                    f"{len(mutated)} bytes: {err}")


def test_npz_and_samples(tmp_path):
    rng = np.random.default_rng(0)
    dataset, samples = tmp_path / "data.npz", tmp_path / "samples.npz"
    np.savez(dataset, images=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), labels=np.array([0, 1, 0, 1]))
    np.savez(samples, images=rng.standard_normal((2, 1, 8, 8)).astype(np.float32), seeds=np.array([0, 1]),
             labels=np.array([0, 1]))
    for path, load in ((dataset, lambda: read_npz(dataset)), (samples, lambda: load_samples(samples))):
        for mutated in mutations(path.read_bytes(), rng):
            check(load, path, mutated)


def test_idx(tmp_path):
    rng = np.random.default_rng(1)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    pixels = rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)
    images.write_bytes(struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 3, 4, 4) + pixels.tobytes())
    labels.write_bytes(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 3) + bytes([0, 1, 2]))
    for path in (images, labels):
        original = path.read_bytes()
        for mutated in mutations(original, rng):
            check(lambda: read_idx(images, labels), path, mutated)
        for mutated in mutations(gzip.compress(original), rng, 10):  # the .gz form
            gz = path.with_name(path.name + ".gz")
            path.unlink(missing_ok=True)
            check(lambda: read_idx(images.with_name(images.name + (".gz" if path == images else "")),
                                   labels.with_name(labels.name + (".gz" if path == labels else ""))), gz, mutated)
            gz.unlink()
        path.write_bytes(original)


def test_cifar_batch(tmp_path):
    rng = np.random.default_rng(2)
    batch = tmp_path / "data_batch_1"
    payload = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 5, 9]}
    batch.write_bytes(pickle.dumps(payload, protocol=2))
    for mutated in mutations(batch.read_bytes(), rng):
        check(lambda: read_cifar10(tmp_path), batch, mutated)


def test_checkpoint(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "model.pt"
    config = ResNetConfig(in_channels=1, image_size=8, width=4, depth=1, norm_groups=0)
    save_checkpoint(path, build_model(config), config, step=1)
    for mutated in mutations(path.read_bytes(), rng):
        check(lambda: load_checkpoint(path), path, mutated)


def test_provenance(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "provenance.npz"
    B, H, W, m, S = 1, 4, 4, 2, 2
    np.savez_compressed(
        path, index=np.zeros((B, H, W, m), np.int64), source=np.zeros((B, H, W, m, 2), np.int64),
        weight=np.full((B, H, W, m), 0.5, np.float32), count=np.ones((B, H, W, m), np.int64),
        n_eff=np.ones((S, B, H, W), np.float32), entropy=np.zeros((S, B, H, W), np.float32),
        t=np.array([1.0, 0.5]), step_patch_sizes=np.array([3, 3]), seeds=np.array([0]), top=np.array(m),
        patch_size=np.array(3))
    load_provenance(path)
    for mutated in mutations(path.read_bytes(), rng):
        check(lambda: load_provenance(path), path, mutated)


def json_mutations(text: str, rng: np.random.Generator):
    """Byte-level mutations plus valid JSON of the wrong shape."""
    yield from mutations(text.encode(), rng, 25)
    data = json.loads(text)
    for wrong in ([], "text", 3, None, [data], {"unrelated": 1}):
        yield json.dumps(wrong).encode()
    for _ in range(15):  # one value replaced by a value of another type
        key = list(data)[int(rng.integers(len(data)))]
        other = [None, "x", -1, 1e308, [], {}, [1, "a"], True][int(rng.integers(8))]
        yield json.dumps({**data, key: other}).encode()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    """A real `sample` run directory (config.json, samples.npz, grid.png)."""
    from click.testing import CliRunner

    from patchmosaic.cli import main

    root = tmp_path_factory.mktemp("fuzzrun")
    rng = np.random.default_rng(5)
    np.savez(root / "tiny.npz", images=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8))
    result = CliRunner().invoke(main, ["sample", "--dataset", str(root / "tiny.npz"), "--size", "native",
                                       "--patch-sizes", "3,3", "--steps", "2", "--seeds", "0-1",
                                       "--out", str(root / "run")])
    assert result.exit_code == 0, result.output
    return root / "run"


def test_schedule_json(tmp_path):
    """Schedule files give a ValueError (their messages belong to schedules.py, being rewritten on main)."""
    rng = np.random.default_rng(6)
    path = tmp_path / "schedule.json"
    PatchSchedule((3, 5, 7)).save(path)
    for mutated in json_mutations(path.read_text(), rng):
        path.write_bytes(mutated)
        try:
            PatchSchedule.load(path)
        except ValueError:
            pass


def test_run_config_and_metrics_json_in_report(sample_run, tmp_path):
    rng = np.random.default_rng(7)
    run = tmp_path / "run"
    shutil.copytree(sample_run, run)
    config = run / "config.json"
    original = config.read_text()
    for i, mutated in enumerate(list(json_mutations(original, rng))[::2]):
        check(lambda: build_report([run], tmp_path / f"report{i}"), config, mutated)
    config.write_text(original)
    metrics = run / "metrics.json"
    good = json.dumps({"config": json.loads(original), "per_seed": [], "aggregates": {}})
    for i, mutated in enumerate(list(json_mutations(good, rng))[::2]):
        check(lambda: build_report([run], tmp_path / f"m{i}"), metrics, mutated)


def test_resume_config_json(sample_run, tmp_path):
    """`sample --resume` reads config.json of the run directory."""
    from patchmosaic.runs import ResumeError, SampleRun

    rng = np.random.default_rng(8)
    run = tmp_path / "run"
    shutil.copytree(sample_run, run)
    config = run / "config.json"
    settings = {k: v for k, v in json.loads(config.read_text()).items()}
    for mutated in json_mutations(config.read_text(), rng):
        config.write_bytes(mutated)
        try:
            SampleRun(run, [0, 1], settings, resume=True)
        except ResumeError as err:
            assert str(run) in str(err)
        except ValueError as err:
            assert "config.json" in str(err) or str(run) in str(err), err


def test_training_config_json_of_pretrained(tmp_path, monkeypatch):
    """The pretrained listing reads each model's config.json, schedule.json and metrics.json."""
    from click.testing import CliRunner

    from patchmosaic.cli import main
    from patchmosaic.pretrained import PRETRAINED_ENV, pretrained_root, write_manifest

    rng = np.random.default_rng(9)
    monkeypatch.delenv(PRETRAINED_ENV, raising=False)
    root = tmp_path / "pre"
    shutil.copytree(pretrained_root() / "mnist-resnet-zeros", root / "m")
    monkeypatch.setenv(PRETRAINED_ENV, str(root))
    for name in ("config.json", "schedule.json", "metrics.json"):
        path = root / "m" / name
        original = path.read_text()
        for mutated in list(json_mutations(original, rng))[::4]:
            path.write_bytes(mutated)
            write_manifest(root)  # the manifest is not what is tested here
            for args in (["pretrained"], ["sample", "--model", "pretrained:m", "--seeds", "0", "--steps", "1",
                                           "--out", str(tmp_path / "o")]):
                result = CliRunner().invoke(main, args)
                assert result.exit_code in (0, 1, 2), result.output
                assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
                    name, args[0], repr(result.exception))
                shutil.rmtree(tmp_path / "o", ignore_errors=True)
        path.write_text(original)
