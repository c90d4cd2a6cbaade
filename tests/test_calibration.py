"""Calibration of k(t) (patchmosaic.calibration) and the ``calibrate`` command.

The round-trip test is the regression test for the released code's off-by-one
(stored at i-1, read at i): a fake "network" that *is* an ELS machine with a
known schedule must be calibrated back to exactly that schedule, and sampling
with the calibrated schedule must reproduce the fake network's samples.
"""

import json

import numpy as np
import pytest
import torch

from patchmosaic.schedules import sigmas_cosine
from click.testing import CliRunner

from patchmosaic import PatchSchedule, ScoreMachine, noise_for_seeds, sample
from patchmosaic.calibration import (
    calibrate,
    check_candidates,
    median_patch_size,
    parse_candidates,
    similarity,
)
from patchmosaic.checkpoints import save_checkpoint
from patchmosaic.denoisers import PatchComposite
from patchmosaic.cli import main
from patchmosaic.models import ResNetConfig, build_model
from patchmosaic.runs import load_samples
from patchmosaic.training import TrainConfig

H = W = 8


@pytest.fixture
def train64():
    """Six random 1x8x8 float64 training images in [-1, 1] with classes 0, 1, 2."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand((6, 1, H, W), generator=g, dtype=torch.float64) * 2 - 1  # [6, 1, H, W]
    return images, torch.tensor([0, 1, 2, 0, 1, 2])


# ------------------------------------------------------------------ pieces


def test_similarity_closed_forms():
    a = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    b = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(similarity(a, a, "cosine"), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(similarity(a, -a, "cosine"), -torch.ones(3, dtype=torch.float64))
    fa, fb = a.reshape(3, -1).numpy(), b.reshape(3, -1).numpy()
    cos = (fa * fb).sum(1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
    np.testing.assert_allclose(similarity(a, b, "cosine").numpy(), cos, rtol=1e-12)
    np.testing.assert_allclose(similarity(a, b, "l2").numpy(), -np.linalg.norm(fa - fb, axis=1), rtol=1e-12)
    assert similarity(a, torch.zeros_like(a), "cosine").tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="unknown metric"):
        similarity(a, b, "l1")


def test_parse_candidates():
    assert parse_candidates("3,5,7") == (3, 5, 7)
    assert parse_candidates("3-11") == (3, 5, 7, 9, 11)
    assert parse_candidates("9, 3-5") == (3, 5, 9)
    for bad, match in (("3,4", "odd"), ("3,3", "repeated"), ("4-8", "odd size"), ("x", "cannot parse"), ("-1", "cannot parse")):
        with pytest.raises(ValueError, match=match):
            parse_candidates(bad)


def test_median_rule_rounds_down_to_a_candidate():
    cands = (3, 5, 7, 9)
    assert median_patch_size([5, 7, 9], cands) == 7  # odd number of seeds: the middle choice
    assert median_patch_size([5, 7], cands) == 5  # median 6 lands between 5 and 7: the lower one
    assert median_patch_size([3, 9], cands) == 5  # median 6
    assert median_patch_size([5, 9], cands) == 7  # median 7 is itself a candidate
    assert median_patch_size([3, 7], (3, 7)) == 3  # median 5 is no candidate: the largest one below


def test_candidates_beyond_the_machine_are_errors(train64):
    images, _ = train64
    els = ScoreMachine(images, kind="els", padding="zeros")
    assert check_candidates(els, [7, 3]) == (3, 7)
    with pytest.raises(ValueError, match="patch size 17 is larger than the 8x8 image.*at most 7"):
        check_candidates(els, [3, 17])
    circ = ScoreMachine(images, kind="els", padding="circular", wrap_training_patches=False)
    with pytest.raises(ValueError, match="no non-wrapping training patch"):
        check_candidates(circ, [3, 9])
    with pytest.raises(ValueError, match="patch machine"):
        check_candidates(ScoreMachine(images, kind="ideal"), [3])


# ------------------------------------------------------------------ round trip

KNOWN = (3, 5, 7, 3)  # asymmetric on purpose: reading row i instead of i-1 would change it


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_calibration_recovers_the_schedule_of_a_machine_network(train64, metric):
    images, _ = train64
    machine = ScoreMachine(images, kind="els", padding="zeros")
    fake_network = machine.bind(patch_sizes=KNOWN)
    noise = noise_for_seeds([0, 1, 2], (1, H, W), dtype=torch.float64)  # [3, 1, H, W]
    result = calibrate(fake_network, machine, noise, candidates=(3, 5, 7), steps=len(KNOWN), metric=metric,
                       seeds=[0, 1, 2])
    assert result.schedule.sizes == KNOWN
    assert (result.choices == np.array(KNOWN)[:, None]).all()  # every seed agrees at every step
    assert result.sigmas == sigmas_cosine(4).flip(0)[1:].tolist()  # row i-1 <-> t = i/n, ascending
    assert result.schedule.sigmas == tuple(result.sigmas)
    # the winning score is exact: cosine 1 / distance 0
    best = result.scores[np.arange(4), [(3, 5, 7).index(k) for k in KNOWN]]  # [4, S]
    np.testing.assert_allclose(best, 1.0 if metric == "cosine" else 0.0, atol=1e-12)
    # and sampling with the calibrated schedule reproduces the fake network's samples
    expected = sample(fake_network, noise, steps=len(KNOWN))
    again = sample(machine, noise, steps=len(KNOWN), patch_sizes=result.schedule)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_calibration_recovers_the_window_schedule_of_a_pspc_network(train64):
    """PSPC's window P(sigma), calibrated against a PSPC 'network' with a known schedule, is recovered exactly."""
    images, _ = train64
    known = PatchSchedule((3, 5, 7, 5), tuple(sigmas_cosine(4).flip(0)[1:].tolist()))  # lowest noise first
    fake_network = PatchComposite(images, patch_size=known)
    candidate = PatchComposite(images, patch_size=3)
    noise = noise_for_seeds([0, 1, 2], (1, H, W), dtype=torch.float64)  # [3, 1, H, W]
    result = calibrate(fake_network, candidate, noise, candidates=(3, 5, 7), steps=4, seeds=[0, 1, 2])
    assert result.schedule.sizes == known.sizes
    assert candidate.patch_size == 3  # the candidates are copies
    expected = sample(fake_network, noise, steps=4)
    again = sample(PatchComposite(images, patch_size=result.schedule), noise, steps=4)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="patch_size must be in 1..8"):
        calibrate(fake_network, candidate, noise, candidates=(3, 9), steps=4)


def test_calibrate_command_pspc(tiny_model, tmp_path):
    ckpt, _ = tiny_model
    out = tmp_path / "cal"
    result = invoke("calibrate", "--model", ckpt, "--denoiser", "pspc", "--candidates", "3,5,7", "--seeds", "0-1",
                    "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    meta = json.loads((out / "schedule.json").read_text())
    assert len(meta["patch_sizes"]) == 2 and set(meta["patch_sizes"]) <= {3, 5, 7}
    assert json.loads((out / "config.json").read_text())["machine"] == "pspc"
    # compare takes it as PSPC's k(sigma)
    cmp = tmp_path / "cmp"
    result = invoke("compare", "--model", ckpt, "--denoisers", "pspc", "--pspc-patch-sizes", out, "--seeds", "0-1",
                    "--steps", 2, "--network-steps", 2, "--bootstrap-resamples", 20, "--out", cmp)
    assert result.exit_code == 0, result.output + repr(result.exception)
    entry = json.loads((cmp / "leaderboard.json").read_text())["leaderboard"][0]
    assert entry["parameters"]["patch_size"] == meta["patch_sizes"]
    bad = invoke("calibrate", "--model", ckpt, "--denoiser", "pspc", "--candidates", "3,9", "--steps", "1",
                 "--out", tmp_path / "c2")
    assert bad.exit_code == 2 and "does not fit" in bad.output


def test_calibration_round_trip_conditional_and_saved(train64, tmp_path):
    images, labels = train64
    machine = ScoreMachine(images, kind="els", padding="zeros", labels=labels)
    seeds = [0, 1, 2, 3]
    label = torch.tensor([s % 3 for s in seeds])  # label_for_seed
    fake_network = machine.bind(patch_sizes=KNOWN, label=label)
    noise = noise_for_seeds(seeds, (1, H, W), dtype=torch.float64)
    result = calibrate(fake_network, machine, noise, candidates=(3, 5, 7), steps=4, label=label, seeds=seeds,
                       shared=False)
    assert result.schedule.sizes == KNOWN and result.labels == [0, 1, 2, 0]
    path = tmp_path / "schedule.json"
    result.save(path, model="fake")
    loaded = PatchSchedule.load(path)
    assert loaded.sizes == KNOWN and [loaded(s) for s in sigmas_cosine(4)[:-1].flip(0)] == list(KNOWN)
    meta = json.loads(path.read_text())
    cal = meta["calibration"]
    assert meta["model"] == "fake" and cal["candidates"] == [3, 5, 7] and cal["seeds"] == seeds
    assert np.array(cal["choices"]).shape == (4, 4) and np.array(cal["scores"]).shape == (4, 3, 4)
    cost = cal["cost"]
    assert len(cost["per_step_ratio"]) == 4 and cost["total_ratio"] >= 1.0
    assert "no work is shared across k" in cost["definition"]


def test_calibration_rejects_bad_inputs(train64):
    images, _ = train64
    machine = ScoreMachine(images, kind="els", padding="zeros")
    net = machine.bind(patch_sizes=(3, 3))
    noise = noise_for_seeds([0], (1, H, W), dtype=torch.float64)
    with pytest.raises(ValueError, match="larger than the 8x8 image"):
        calibrate(net, machine, noise, candidates=(3, 99), steps=2)
    with pytest.raises(ValueError, match="unknown metric"):
        calibrate(net, machine, noise, candidates=(3,), steps=2, metric="l1")
    with pytest.raises(ValueError, match="2 seeds for a batch of 1"):
        calibrate(net, machine, noise, candidates=(3,), steps=2, seeds=[0, 1])


# ------------------------------------------------------------------ command


@pytest.fixture
def tiny_model(tmp_path):
    """An untrained tiny ResNet checkpoint whose train config names a 6-image .npz set."""
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, images=rng.integers(0, 256, (6, H, W), dtype=np.uint8), labels=np.array([0, 1, 2, 0, 1, 2]))
    config = ResNetConfig(in_channels=1, image_size=H, width=4, depth=1, norm_groups=0)
    torch.manual_seed(0)
    model = build_model(config)
    path = tmp_path / "model.pt"
    train = TrainConfig(dataset=str(data), n_train=6, image_size=None, model=config, steps=1)
    save_checkpoint(path, model, config, step=1, train_config=train.to_dict())
    return path, data


def invoke(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def test_calibrate_command_writes_a_schedule_that_sample_accepts(tiny_model, tmp_path):
    ckpt, data = tiny_model
    out = tmp_path / "cal"
    result = invoke("calibrate", "--model", ckpt, "--candidates", "3,5", "--seeds", "0-2", "--steps", "3",
                    "--out", out)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "calibrated schedule" in result.output and "in the machine (all candidates of a step in one call" in result.output
    meta = json.loads((out / "schedule.json").read_text())
    assert len(meta["patch_sizes"]) == 3 and set(meta["patch_sizes"]) <= {3, 5}
    assert meta["calibration"]["training_set"]["n_train"] == 6 and meta["calibration"]["metric"] == "cosine"
    config = json.loads((out / "config.json").read_text())
    assert config["training_set"]["padding"] == "zeros" and config["seeds"] == [0, 1, 2]
    # the schedule file (and its directory) is a valid --patch-sizes
    for spec in (out / "schedule.json", out):
        run = tmp_path / f"sample-{spec.name}"
        result = invoke("sample", "--dataset", data, "--size", "native", "--patch-sizes", spec, "--steps", 3,
                        "--seeds", "0-1", "--out", run)
        assert result.exit_code == 0, result.output
        assert json.loads((run / "config.json").read_text())["patch_sizes"] == meta["patch_sizes"]
        assert load_samples(run)["images"].shape == (2, 1, H, W)
    # one call per candidate on request: the same schedule, with the cost ratio
    separate = invoke("calibrate", "--model", ckpt, "--candidates", "3,5", "--seeds", "0-2", "--steps", "3",
                      "--separate-calls", "--out", tmp_path / "cal-separate")
    assert separate.exit_code == 0 and "cost =" in separate.output
    assert json.loads((tmp_path / "cal-separate" / "schedule.json").read_text())["patch_sizes"] == meta["patch_sizes"]
    # non-empty --out is refused
    result = invoke("calibrate", "--model", ckpt, "--candidates", "3", "--steps", "1", "--out", out)
    assert result.exit_code != 0 and "--overwrite" in result.output


def test_calibrate_workers_choose_the_same_schedule(tiny_model, tmp_path):
    """--workers 2 splits the seeds between two threads: the same schedule as one stream; not for pspc."""
    ckpt, _ = tiny_model
    schedules = []
    for n in (1, 2):
        out = tmp_path / f"cal-{n}"
        result = invoke("calibrate", "--model", ckpt, "--candidates", "3,5,7", "--seeds", "0-3", "--steps", "3",
                        "--workers", n, "--out", out)
        assert result.exit_code == 0, result.output + repr(result.exception)
        schedules.append(json.loads((out / "schedule.json").read_text())["patch_sizes"])
    assert schedules[0] == schedules[1]
    bad = invoke("calibrate", "--model", ckpt, "--denoiser", "pspc", "--candidates", "3,5", "--steps", "1",
                 "--workers", 2, "--out", tmp_path / "cal-pspc")
    assert bad.exit_code != 0 and "--workers" in bad.output and "pspc" in bad.output
    assert not (tmp_path / "cal-pspc").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--candidates", "3,4"], "must be odd"),
        (["--candidates", "3,17"], "patch size 17 is larger than the 8x8 image"),
        (["--metric", "l1"], "'l1' is not one of"),
        (["--seeds", "3-1"], "reversed"),
    ],
)
def test_calibrate_command_errors(tiny_model, tmp_path, args, fragment):
    ckpt, _ = tiny_model
    result = invoke("calibrate", "--model", ckpt, "--steps", "1", *args, "--out", tmp_path / "cal")
    assert result.exit_code != 0 and fragment in result.output and "Traceback" not in result.output
    assert not (tmp_path / "cal").exists()


def test_shared_calls_give_the_separate_calls_result(train64, monkeypatch):
    """One denoise_sizes call per step (nested windows, every size shared here) scores like one call per size."""
    import patchmosaic.denoisers.score_machines as score_machines

    monkeypatch.setattr(score_machines, "NESTED_FROM", 1)
    images, labels = train64
    machine = ScoreMachine(images, kind="els", padding="zeros", labels=labels)
    seeds = [0, 1, 2, 3]
    label = torch.tensor([s % 3 for s in seeds])
    fake_network = machine.bind(patch_sizes=KNOWN, label=label)
    noise = noise_for_seeds(seeds, (1, H, W), dtype=torch.float64)
    runs = {shared: calibrate(fake_network, machine, noise, candidates=(3, 5, 7), steps=4, label=label,
                              seeds=seeds, shared=shared) for shared in (True, False)}
    assert runs[True].shared and not runs[False].shared
    assert runs[True].schedule.sizes == runs[False].schedule.sizes == KNOWN
    np.testing.assert_array_equal(runs[True].choices, runs[False].choices)
    np.testing.assert_allclose(runs[True].scores, runs[False].scores, atol=1e-12, rtol=0)
    cost = runs[True].cost()
    assert len(cost["per_step_seconds"]) == 4 and cost["machine_seconds_total"] > 0
    assert np.isnan(runs[True].candidate_seconds).all()
