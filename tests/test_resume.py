"""``sample`` writes finished batches as they complete, and ``--resume`` continues an interrupted run."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from patchmosaic.samplers import SAMPLERS
from patchmosaic.cli import main
from patchmosaic.runs import BATCH_DIR, load_samples

from test_cli import H, tiny  # noqa: F401 - the 6-image labelled dataset fixture

FAST = ["--size", "native", "--patch-sizes", "3,3", "--steps", "2", "--batch-size", "2"]


def run(*args):
    return CliRunner().invoke(main, ["sample", *map(str, args)])


class Interrupt(Exception):
    """Stands in for a crash or Ctrl-C in the middle of a run."""


def fail_after(monkeypatch, calls):
    """Make the sampler raise on its call number ``calls + 1`` (after ``calls`` batches finished)."""
    real, seen = SAMPLERS["euler"], []

    def flaky(*args, **kwargs):
        if len(seen) == calls:
            raise Interrupt("interrupted")
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setitem(SAMPLERS, "euler", flaky)


@pytest.mark.parametrize("extra", [[], ["--provenance"], ["--like-labels"]])
def test_interrupted_run_resumes_to_the_uninterrupted_samples(tiny, tmp_path, monkeypatch, extra):
    extra = ["--label", "1"] if extra == ["--like-labels"] else extra
    args = ["--dataset", tiny, *FAST, "--seeds", "0-6", *extra]
    full = tmp_path / "full"
    assert run(*args, "--out", full).exit_code == 0

    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fail_after(m, 2)  # two batches (seeds 0-3) finish, the third raises
        result = run(*args, "--out", out)
    assert isinstance(result.exception, Interrupt)
    assert "4 finished samples are kept" in result.output and "--resume" in result.output
    kept = sorted(p.name for p in (out / BATCH_DIR).iterdir())
    assert kept == sorted(["batch-s0-n2.npz", "batch-s2-n2.npz"]
                          + (["batch-s0-n2.provenance.npz", "batch-s2-n2.provenance.npz"] if extra == ["--provenance"]
                             else []))
    assert json.loads((out / "config.json").read_text())["status"] == "incomplete"
    assert not (out / "samples.npz").exists()
    assert load_samples(out / BATCH_DIR / "batch-s2-n2.npz")["seeds"].tolist() == [2, 3]

    # Without --resume (or with --overwrite) the interrupted run is refused, untouched.
    refused = run(*args, "--out", out)
    assert refused.exit_code == 2 and "--resume" in refused.output
    refused = run(*args, "--out", out, "--overwrite")
    assert refused.exit_code == 2 and "interrupted sample run" in refused.output
    assert sorted(p.name for p in (out / BATCH_DIR).iterdir()) == kept

    calls = []
    real = SAMPLERS["euler"]
    monkeypatch.setitem(SAMPLERS, "euler", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    resumed = run(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert calls == [2, 1]  # only seeds 4-6 were sampled
    assert "4 of 7 seeds already sampled" in resumed.output
    a, b = load_samples(full), load_samples(out)
    assert b["seeds"].tolist() == list(range(7))
    np.testing.assert_array_equal(a["images"], b["images"])
    assert ("labels" in a) == ("labels" in b) and (a.get("labels") is None or (a["labels"] == b["labels"]).all())
    assert not (out / BATCH_DIR).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["status"] == "complete" and config["resumed"] == {"kept": 4, "sampled": 3}
    if extra == ["--provenance"]:
        pa, pb = np.load(full / "provenance.npz"), np.load(out / "provenance.npz")
        for key in pa.files:
            np.testing.assert_array_equal(pa[key], pb[key], err_msg=key)


def test_killed_subprocess_keeps_finished_batches(tiny, tmp_path):
    """A real kill (SIGKILL after the first batch file appears) keeps that batch; --resume completes the run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = ["--dataset", str(tiny), "--size", "native", "--patch-sizes", ",".join(["3"] * 40), "--steps", "40",
            "--batch-size", "1", "--seeds", "0-5"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "patchmosaic", "sample", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (out / BATCH_DIR / "batch-s0-n1.npz").exists() and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / BATCH_DIR).glob("batch-*.npz"))
    assert "batch-s0-n1.npz" in done
    assert not list((out / BATCH_DIR).glob(".*")) or all(p.name.startswith(".") for p in (out / BATCH_DIR).glob(".*"))
    resumed = run(*args, "--out", out, "--resume")
    assert resumed.exit_code == 0, resumed.output
    full = run(*args, "--out", tmp_path / "full")
    assert full.exit_code == 0
    np.testing.assert_array_equal(load_samples(out)["images"], load_samples(tmp_path / "full")["images"])


@pytest.mark.parametrize(
    ("change", "keys"),
    [
        (["--steps", "3", "--patch-sizes", "3,3,3"], ["steps", "patch_sizes"]),
        (["--padding", "circular"], ["padding"]),
        (["--label", "2"], ["label"]),
        (["--dtype", "float64"], ["dtype"]),
    ],
)
def test_resume_refuses_a_different_configuration_naming_the_keys(tiny, tmp_path, monkeypatch, change, keys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fail_after(m, 1)
        run("--dataset", tiny, *FAST, "--seeds", "0-5", "--out", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = {**dict(zip(FAST[::2], FAST[1::2])), **dict(zip(change[::2], change[1::2]))}
    result = run("--dataset", tiny, *[x for kv in args.items() for x in kv], "--seeds", "0-5", "--out", out,
                 "--resume")
    assert result.exit_code == 2, result.output
    assert "--resume" in result.output and "differs" in result.output
    for key in keys:
        assert f"{key}:" in result.output, (key, result.output)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_refuses_to_drop_seeds_and_needs_a_run(tiny, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fail_after(m, 2)
        run("--dataset", tiny, *FAST, "--seeds", "0-5", "--out", out)
    result = run("--dataset", tiny, *FAST, "--seeds", "2-5", "--out", out, "--resume")
    assert result.exit_code == 2 and "seeds not in --seeds (0, 1)" in result.output, result.output
    result = run("--dataset", tiny, *FAST, "--seeds", "0-5", "--out", tmp_path / "empty", "--resume")
    assert result.exit_code == 2 and "nothing to resume" in result.output
    assert not (tmp_path / "empty").exists()
    result = run("--dataset", tiny, *FAST, "--seeds", "0-5", "--out", out, "--resume", "--overwrite")
    assert result.exit_code == 2 and "pass one" in result.output


def test_resume_of_a_complete_run_adds_seeds_with_another_batch_size(tiny, tmp_path):
    full, out = tmp_path / "full", tmp_path / "run"
    assert run("--dataset", tiny, *FAST, "--seeds", "0-4", "--out", full).exit_code == 0
    assert run("--dataset", tiny, *FAST, "--seeds", "0-2", "--out", out).exit_code == 0
    result = run("--dataset", tiny, *FAST, "--seeds", "0-4", "--batch-size", "1", "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert "3 of 5 seeds already sampled" in result.output
    np.testing.assert_array_equal(load_samples(full)["images"], load_samples(out)["images"])


def test_network_sample_resumes(tiny, tmp_path, monkeypatch):
    """`sample --model` writes batches and resumes the same way."""
    from patchmosaic.checkpoints import save_checkpoint
    from patchmosaic.models import ResNetConfig, build_model
    from patchmosaic.training import TrainConfig

    config = ResNetConfig(in_channels=1, image_size=H, width=4, depth=1, norm_groups=0, num_classes=3)
    model = tmp_path / "model.pt"
    train = TrainConfig(dataset=str(tiny), n_train=6, image_size=None, conditional=True, model=config, steps=1)
    save_checkpoint(model, build_model(config), config, step=1, train_config=train.to_dict())
    args = ["--model", model, "--steps", "3", "--batch-size", "2", "--seeds", "0-4"]
    assert run(*args, "--out", tmp_path / "full").exit_code == 0

    real, seen = SAMPLERS["euler"], []

    def flaky(*a, **k):
        if seen:
            raise KeyboardInterrupt
        seen.append(1)
        return real(*a, **k)

    with monkeypatch.context() as m:
        m.setitem(SAMPLERS, "euler", flaky)
        result = run(*args, "--out", tmp_path / "net")
    assert result.exit_code != 0 and "2 finished samples are kept" in result.output
    assert [p.name for p in (tmp_path / "net" / BATCH_DIR).iterdir()] == ["batch-s0-n2.npz"]
    resumed = run(*args, "--out", tmp_path / "net", "--resume")
    assert resumed.exit_code == 0, resumed.output
    a, b = load_samples(tmp_path / "full"), load_samples(tmp_path / "net")
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
