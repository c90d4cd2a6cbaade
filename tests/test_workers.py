"""``ScoreMachine(workers=n)``: a call's batch split between threads equals the single-stream call."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from patchmosaic import ScoreMachine
from patchmosaic.denoisers.score_machines import _PatchMachine


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    train = torch.rand(12, 1, 9, 9, generator=gen, dtype=torch.float64) * 2 - 1
    train[:3, :, :4] = -1.0  # constant regions: the compacted path
    labels = torch.arange(12) % 3
    x = torch.randn(5, 1, 9, 9, generator=gen, dtype=torch.float64)
    return train, labels, x


@pytest.mark.parametrize("kind, padding, k", [("els", "zeros", 3), ("els", "zeros", 5), ("els", "circular", 3),
                                              ("ls", "zeros", 3), ("ideal", "zeros", None),
                                              ("es", "circular", None)])
@pytest.mark.parametrize("conditional", [False, True])
def test_workers_equal_one_stream(kind, padding, k, conditional):
    train, labels, x = _data()
    label = torch.tensor([0, 1, 2, 0, 1]) if conditional else None
    common = dict(kind=kind, padding=padding, labels=labels, chunk_elements=3000)
    one = ScoreMachine(train, **common)
    split = ScoreMachine(train, **common, workers=3)
    threads = torch.get_num_threads()
    for ab in (0.2, 0.9):
        torch.testing.assert_close(split.denoise(x, ab, patch_size=k, label=label),
                                   one.denoise(x, ab, patch_size=k, label=label), rtol=1e-12, atol=1e-12)
        assert torch.get_num_threads() == threads  # restored after the call
    ref_x0, ref = one.denoise_provenance(x, 0.97, patch_size=k, label=label, top=4)
    x0, prov = split.denoise_provenance(x, 0.97, patch_size=k, label=label, top=4)
    torch.testing.assert_close(x0, ref_x0, rtol=1e-12, atol=1e-12)
    for name in ("index", "source", "count"):
        assert torch.equal(getattr(prov, name), getattr(ref, name)), name
    for name in ("weight", "n_eff", "entropy"):
        torch.testing.assert_close(getattr(prov, name), getattr(ref, name), rtol=1e-10, atol=1e-12)
    if k is not None:  # the same (row, candidate) pairs, counted over every worker and class
        assert split.prune_stats[1] == one.prune_stats[1] > 0


def test_each_worker_streams_its_part_of_the_batch_in_its_own_thread(monkeypatch):
    train, _, x = _data(1)
    calls = []
    inner = _PatchMachine._denoise

    def spy(self, x_t, *a, **kw):
        calls.append((threading.current_thread().name, x_t.shape[0], torch.get_num_threads()))
        return inner(self, x_t, *a, **kw)

    monkeypatch.setattr(_PatchMachine, "_denoise", spy)
    ScoreMachine(train, kind="els", workers=2).denoise(x, 0.5, patch_size=3)
    assert sorted(b for _, b, _ in calls) == [2, 3]  # contiguous parts of the 5 samples
    # each part in a worker thread of its own (names, not idents: a finished thread's ident may be reused)
    assert {name for name, _, _ in calls} == {"patchmosaic-worker-0", "patchmosaic-worker-1"}
    assert {n for _, _, n in calls} == {1}  # one torch thread per worker
    calls.clear()
    ScoreMachine(train, kind="els", workers=8).denoise(x[:1], 0.5, patch_size=3)
    assert [(b, n) for _, b, n in calls] == [(1, torch.get_num_threads())]  # one sample: no split


def test_sample_workers_flag(tmp_path):
    """--workers 2 samples what --workers 1 samples; where it cannot apply it is a usage error."""
    from click.testing import CliRunner

    from patchmosaic.cli import main
    from patchmosaic.runs import load_samples

    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8))
    args = ["sample", "--dataset", str(data), "--size", "native", "--patch-sizes", "3,5", "--steps", "2",
            "--seeds", "0-3"]
    for n in (1, 2):
        result = CliRunner().invoke(main, [*args, "--workers", str(n), "--out", str(tmp_path / f"w{n}")])
        assert result.exit_code == 0, result.output
    one, two = (load_samples(tmp_path / f"w{n}")["images"] for n in (1, 2))
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-5)
    compute = json.loads((tmp_path / "w2" / "config.json").read_text())["compute"]
    assert compute == {"device": "cpu", "threads": torch.get_num_threads(), "workers": 2, "kernel": "torch",
                       "kernel_precision": None}
    # where a run computed is no part of its samples: a resume may use other workers
    result = CliRunner().invoke(main, [*args[:-1], "0-5", "--workers", "1", "--out", str(tmp_path / "w2"), "--resume"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "w2" / "config.json").read_text())["compute"]["workers"] == 1
    result = CliRunner().invoke(main, ["sample", "--dataset", str(data), "--size", "native", "--denoiser", "wiener",
                                       "--steps", "2", "--workers", "2", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "--workers" in result.output and "wiener" in result.output


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("conditional", [False, True])
def test_workers_split_denoise_sizes(padding, conditional):
    """Calibration's every-size call (nested stream and single-size path) split between workers."""
    gen = torch.Generator().manual_seed(3)
    train = torch.rand(10, 1, 11, 11, generator=gen, dtype=torch.float64) * 2 - 1
    labels = torch.arange(10) % 2
    x = torch.randn(5, 1, 11, 11, generator=gen, dtype=torch.float64)
    label = torch.tensor([0, 1, 1, 0, 1]) if conditional else None
    one = ScoreMachine(train, kind="els", padding=padding, labels=labels, chunk_elements=5000)
    split = ScoreMachine(train, kind="els", padding=padding, labels=labels, chunk_elements=5000, workers=2)
    ref = one.denoise_sizes(x, 0.7, [3, 7, 9, 11], label=label)
    got = split.denoise_sizes(x, 0.7, [3, 7, 9, 11], label=label)
    assert list(got) == list(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)


def test_an_error_in_a_worker_reaches_the_caller_and_threads_are_restored(monkeypatch):
    train, _, x = _data(2)
    threads = torch.get_num_threads()

    def broken(self, x_t, *a, **kw):
        raise RuntimeError(f"worker failed on {x_t.shape[0]} samples")

    monkeypatch.setattr(_PatchMachine, "_denoise", broken)
    with pytest.raises(RuntimeError, match="worker failed"):
        ScoreMachine(train, kind="els", workers=2).denoise(x, 0.5, patch_size=3)
    assert torch.get_num_threads() == threads
