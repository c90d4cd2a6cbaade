"""Sharding the training set over 2 gloo processes on localhost gives the single-process result."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from patchmosaic import ScoreMachine

CASES = [("ideal", "zeros", None, None), ("es", "circular", None, None), ("ls", "zeros", 3, None),
         ("els", "zeros", 5, None), ("els", "circular", 3, None), ("els", "zeros", 3, "labels")]
PROVENANCE_CASES = [("ideal", "zeros", None, None), ("es", "circular", None, None), ("els", "circular", 3, None),
                    ("els", "circular", 5, "labels")]


def _inputs():
    g = torch.Generator().manual_seed(0)
    train = torch.rand(7, 1, 7, 6, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # class 2 lives on one shard only
    x = torch.randn(3, 1, 7, 6, generator=g, dtype=torch.float64)
    return train, labels, x


def _results(distributed: bool) -> list[torch.Tensor]:
    train, labels, x = _inputs()
    out = []
    for kind, padding, k, cond in CASES:
        m = ScoreMachine(train, kind=kind, padding=padding, labels=labels, distributed=distributed,
                         chunk_elements=64)
        label = torch.tensor([2, 0, 1]) if cond else None
        out.append(m.denoise(x, torch.tensor([0.2, 0.6, 0.95], dtype=torch.float64), patch_size=k, label=label))
    # Provenance: top candidates, N_eff and entropy, with constant patches spread over both shards.
    # Each image has its own background value so that no two candidates tie (tied entries may come
    # in any order); the two images of background -1 share a constant-patch entry across the shards.
    background = (torch.arange(7, dtype=torch.float64) * 0.1 - 1.0)[:, None, None, None].expand_as(train).clone()
    background[6] = -1.0
    background[:, :, 2:5, 1:4] = train[:, :, 2:5, 1:4]
    for kind, padding, k, cond in PROVENANCE_CASES:
        m = ScoreMachine(background, kind=kind, padding=padding, labels=labels, distributed=distributed,
                         chunk_elements=64)
        label = torch.tensor([2, 0, 1]) if cond else None
        _, prov = m.denoise_provenance(x, torch.tensor([0.2, 0.6, 0.95], dtype=torch.float64), patch_size=k,
                                       label=label, top=3)
        out += [prov.weight, prov.index, prov.source, prov.count, prov.n_eff, prov.entropy]
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = _results(distributed=True)
        if rank == 0:
            torch.save(results, path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_shards_equal_single_process(tmp_path):
    path = str(tmp_path / "sharded.pt")
    mp.spawn(_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    sharded = torch.load(path, weights_only=True)
    want_all = _results(distributed=False)
    assert len(sharded) == len(want_all) == len(CASES) + 6 * len(PROVENANCE_CASES)
    names = [f"{c}" for c in CASES] + [f"{c} provenance {f}" for c in PROVENANCE_CASES for f in range(6)]
    for name, got, want in zip(names, sharded, want_all):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)


def test_distributed_needs_an_initialised_group():
    with pytest.raises(ValueError, match="init_process_group"):
        ScoreMachine(torch.rand(2, 1, 4, 4), kind="els", distributed=True)


def test_cli_under_torchrun_matches_single_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    g = torch.Generator().manual_seed(2)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=(torch.rand(9, 1, 8, 8, generator=g) * 2 - 1).numpy(), labels=np.arange(9) % 3)
    args = ["sample", "--dataset", str(data), "--size", "native", "--machine", "els", "--patch-sizes", "3,5",
            "--steps", "2", "--seeds", "0-2", "--chunk-elements", "64"]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "patchmosaic", *args,
                    "--out", str(tmp_path / "sharded"), "--distributed"], check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "patchmosaic", *args, "--out", str(tmp_path / "single")],
                   check=True, env=env, capture_output=True)
    sharded = np.load(tmp_path / "sharded" / "samples.npz")["images"]
    single = np.load(tmp_path / "single" / "samples.npz")["images"]
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    import json

    assert json.loads((tmp_path / "sharded" / "config.json").read_text())["distributed"]["world_size"] == 2


def test_cli_distributed_outside_torchrun_is_refused(tmp_path):
    from click.testing import CliRunner

    from patchmosaic.cli import main

    result = CliRunner().invoke(main, ["sample", "--dataset", "mnist", "--n-train", "5", "--patch-sizes", "3",
                                       "--steps", "1", "--seeds", "0", "--out", str(tmp_path / "o"), "--distributed"])
    assert result.exit_code != 0 and "torchrun" in result.output
    assert not (tmp_path / "o").exists()
