"""scripts/table1.py on a fake reproduce_table1.sh output built from a real ``evaluate`` metrics.json.

``fixtures/evaluate_metrics_2seeds.json`` is an unedited ``patchmosaic evaluate`` output
(pretrained fashion-resnet-zeros-cond, seeds 1000-1001, network 150 steps, ELS reused
from a ``sample`` run); the other files here are copies with a few values changed.
"""

import copy
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = json.loads((ROOT / "tests" / "fixtures" / "evaluate_metrics_2seeds.json").read_text())
# an unedited `patchmosaic compare` output: the same model and seeds, every denoiser, ELS reused (--reuse)
BOARD = json.loads((ROOT / "tests" / "fixtures" / "compare_leaderboard_2seeds.json").read_text())
SPEC = importlib.util.spec_from_file_location("table1", ROOT / "scripts" / "table1.py")
table1 = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(table1)


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def metrics(network_steps=150, els_r=None, seeds=None, patch_sizes=None, wins=None):
    """The real metrics.json with some entries replaced."""
    data = copy.deepcopy(REAL)
    data["config"]["network_steps"] = network_steps
    if els_r is not None:
        data["aggregates"]["els"]["pearson_r"].update(zip(("median", "ci_low", "ci_high"), els_r))
    if seeds is not None:
        data["config"]["seeds"], data["n_seeds"] = seeds, len(seeds)
        data["fraction_machine_beats_baseline"]["n"] = len(seeds)
    if patch_sizes is not None:
        data["config"]["patch_sizes"] = patch_sizes
    if wins is not None:
        data["fraction_machine_beats_baseline"]["wins"] = wins
    return data


K_FASHION = REAL["config"]["patch_sizes"]  # 3,3,3,3,5,...,13,13 (20 entries)
K_CAL = [3] * 10 + [5] * 10


@pytest.fixture
def run_dir(tmp_path):
    """Two Table 1 models (one complete, one without its 20/20 run), an extra model, four missing."""
    run, pretrained = tmp_path / "table1", tmp_path / "pretrained"
    write_json(pretrained / "fashion-resnet-zeros-cond" / "schedule.json", {"patch_sizes": K_FASHION})
    write_json(run / "evaluate-150-fashion-resnet-zeros-cond" / "metrics.json", REAL)
    write_json(run / "evaluate-20-fashion-resnet-zeros-cond" / "metrics.json",
               metrics(network_steps=20, els_r=(0.8996712858386895, 0.881, 0.9174)))
    write_json(run / "calibrate-mnist-unet-zeros" / "schedule.json", {"patch_sizes": K_CAL})
    write_json(run / "evaluate-150-mnist-unet-zeros" / "metrics.json",
               metrics(seeds=[5, 6, 7, 9], patch_sizes=K_CAL, wins=3))
    write_json(run / "evaluate-20-my-model" / "metrics.json", metrics(network_steps=20))
    (run / "els-mnist-resnet-zeros").mkdir()  # ELS sampled, not evaluated yet: still missing
    return run, pretrained


def cells(table, model):
    line = next(line for line in table.splitlines() if line.startswith(f"| `{model}` |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_rows_cells_and_notes(run_dir):
    run, pretrained = run_dir
    table = table1.build_table(run, pretrained=pretrained)
    lines = table.splitlines()
    assert lines[0] == ("| model | calibrated k(sigma), lowest noise first | seeds (n) | ELS median r [95% CI], "
                        "paper protocol | ELS median r [95% CI], 20/20 | IS median r [95% CI], paper protocol | "
                        "ELS R^2 [95% CI], paper protocol | ELS beats IS, paper protocol |")
    assert [line.split("|")[1].strip() for line in lines[2:5]] == [
        "`fashion-resnet-zeros-cond`", "`mnist-unet-zeros`", "`my-model`"]  # Table 1's order, then the others
    assert lines[5] == ""
    # The real file's numbers: els pearson_r 0.92325 [0.90671, 0.93979], ideal 0.55704 [0.53334, 0.58074],
    # els R2 0.84556 [0.81244, 0.87868], 2 wins of 2.
    assert cells(table, "fashion-resnet-zeros-cond") == [
        "`fashion-resnet-zeros-cond`", "3,3,3,3,5,5,5,5,5,7,7,7,7,9,9,9,9,11,13,13", "1000-1001 (2)",
        "0.923 [0.907, 0.940]", "0.900 [0.881, 0.917]", "0.557 [0.533, 0.581]", "0.846 [0.812, 0.879]", "2/2",
    ]
    assert cells(table, "mnist-unet-zeros") == [
        "`mnist-unet-zeros`", ",".join(map(str, K_CAL)), "5-7, 9 (4)",
        "0.923 [0.907, 0.940]", "–", "0.557 [0.533, 0.581]", "0.846 [0.812, 0.879]", "3/4",
    ]
    assert cells(table, "my-model") == ["`my-model`", ",".join(map(str, K_FASHION)), "1000-1001 (2)", "–",
                                        "0.923 [0.907, 0.940]", "–", "–", "–"]  # k(sigma) as evaluate recorded it
    notes = lines[6:]
    assert "- paper protocol (`evaluate-150-NAME`): network 150 DDIM steps, machines 20 steps." in notes
    assert "- 20/20 (`evaluate-20-NAME`): network 20 DDIM steps, machines 20 steps." in notes
    assert (f"- Missing (no evaluate-150 or evaluate-20 metrics in {run}): `mnist-resnet-zeros`, "
            "`mnist-resnet-circular`, `fashion-unet-zeros-cond`, `mnist-unet-attention`.") in notes
    assert "- `mnist-unet-zeros`: no evaluate-20-mnist-unet-zeros/metrics.json (20/20 cells: –)" in notes
    assert "- `my-model`: no evaluate-150-my-model/metrics.json (paper protocol cells: –)" in notes
    assert any(n.startswith("- `my-model`: no schedule.json in ") and
               n.endswith("; k(sigma) as evaluate-20-my-model recorded it") for n in notes)
    assert not any("fashion-resnet-zeros-cond" in n for n in notes)  # complete and consistent


def test_inconsistent_files_are_noted(run_dir):
    run, pretrained = run_dir
    write_json(run / "evaluate-20-fashion-resnet-zeros-cond" / "metrics.json",
               metrics(network_steps=20, seeds=[1000, 1001, 1002], patch_sizes=K_CAL))
    table = table1.build_table(run, pretrained=pretrained, models=("fashion-resnet-zeros-cond",))
    assert cells(table, "fashion-resnet-zeros-cond")[2] == "1000-1001 (2) / 1000-1002 (3)"
    schedule = pretrained / "fashion-resnet-zeros-cond" / "schedule.json"
    assert (f"- `fashion-resnet-zeros-cond`: evaluate-20-fashion-resnet-zeros-cond used k = "
            f"{','.join(map(str, K_CAL))}, not the schedule in {schedule}") in table
    assert "- `fashion-resnet-zeros-cond`: the two evaluations used different seeds" in table
    assert "Missing" not in table and "`my-model`" in table  # --models replaces Table 1's list


def test_undefined_median_reads_n_a(run_dir):
    """A median evaluate could not define (NaN, e.g. R^2 of a constant network image) is "n/a", as in leaderboards."""
    run, pretrained = run_dir
    data = metrics()
    data["aggregates"]["els"]["R2"].update(median=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
    write_json(run / "evaluate-150-fashion-resnet-zeros-cond" / "metrics.json", data)
    table = table1.build_table(run, pretrained=pretrained, models=("fashion-resnet-zeros-cond",))
    assert cells(table, "fashion-resnet-zeros-cond")[6] == "n/a"


def test_denoiser_table_from_compare_leaderboards(run_dir):
    run, pretrained = run_dir
    write_json(run / "compare-fashion-resnet-zeros-cond" / "leaderboard.json", BOARD)
    table = table1.build_table(run, pretrained=pretrained)
    lines = table.splitlines()
    start = lines.index("Every denoiser against each network (`compare-NAME`, paper protocol; after each r: seeds "
                        "where ELS's r is strictly greater):")
    assert lines[start + 2] == ("| model | seeds (n) | ELS median r [95% CI] | LS median r [95% CI] | IS median r "
                                "[95% CI] | Wiener median r [95% CI] | data-locality median r [95% CI] | PSPC median "
                                "r [95% CI] | nearest training image median r [95% CI] |")
    # the real file's numbers (leaderboard.md of that run): ELS 0.923 [0.907, 0.940], LS 0.699 [0.546, 0.851],
    # IS 0.557 [0.533, 0.581], ..., ELS ahead on 2 of 2 seeds of each
    assert cells(table.split("Every denoiser")[1], "fashion-resnet-zeros-cond") == [
        "`fashion-resnet-zeros-cond`", "1000-1001 (2)", "0.923 [0.907, 0.940]", "0.699 [0.546, 0.851] (2/2)",
        "0.557 [0.533, 0.581] (2/2)", "0.670 [0.595, 0.746] (2/2)", "0.614 [0.513, 0.715] (2/2)",
        "0.674 [0.553, 0.795] (2/2)", "0.544 [0.533, 0.555] (2/2)"]
    notes = lines[start + 5:]
    assert notes[0] == "" and notes[1] == "- network 150 DDIM steps, denoisers 20 steps."
    schedule = "/work/wt-dev/src/patchmosaic/pretrained/fashion-resnet-zeros-cond/schedule.json"
    assert notes[2] == (f"- `fashion-resnet-zeros-cond` knobs: ELS k(sigma) from {schedule}; LS k(sigma) from {schedule}; "
                        "data-locality threshold 0.005; PSPC patch_size published CIFAR-10 k(sigma).")
    assert "- No compare-NAME/leaderboard.json: `mnist-unet-zeros`." in notes
    assert ("- `fashion-resnet-zeros-cond`: compare-fashion-resnet-zeros-cond took its ELS samples from "
            "runs/table1/els-fashion-resnet-zeros-cond, evaluate-150-fashion-resnet-zeros-cond from "
            "/tmp/t1q/els-fashion-resnet-zeros-cond") in notes
    board = copy.deepcopy(BOARD)
    board["leaderboard"] = [e for e in board["leaderboard"] if e["name"] != "els"]
    bad = run / "compare-fashion-resnet-zeros-cond" / "leaderboard.json"
    write_json(bad, board)
    with pytest.raises(table1.Table1Error, match=re.escape(f"{bad} has no 'els' entry")):
        table1.build_table(run, pretrained=pretrained)


def test_errors_name_the_file(run_dir, tmp_path):
    run, pretrained = run_dir
    bad = run / "evaluate-150-mnist-unet-zeros" / "metrics.json"
    write_json(bad, metrics(network_steps=20))
    with pytest.raises(table1.Table1Error, match=re.escape(f"{bad} ran the network with 20 steps, but its directory says 150")):
        table1.build_table(run, pretrained=pretrained)
    data = metrics()
    del data["aggregates"]["els"]["R2"]
    write_json(bad, data)
    with pytest.raises(table1.Table1Error, match=re.escape(f"{bad} has no aggregates.els.R2")):
        table1.build_table(run, pretrained=pretrained)
    bad.write_text("{not json")
    with pytest.raises(table1.Table1Error, match=re.escape(f"cannot read {bad}")):
        table1.build_table(run, pretrained=pretrained)
    with pytest.raises(table1.Table1Error, match="is not a directory"):
        table1.build_table(tmp_path / "nope")


def test_command_line(run_dir, tmp_path):
    run, pretrained = run_dir
    out = tmp_path / "table1.md"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "table1.py"), str(run), "--out", str(out),
                           "--pretrained", str(pretrained)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {out}\n"
    assert out.read_text() == table1.build_table(run, pretrained=pretrained)
    failed = subprocess.run([sys.executable, str(ROOT / "scripts" / "table1.py"), str(tmp_path / "nope"),
                             "--out", str(out)], capture_output=True, text=True, check=False)
    assert failed.returncode == 1, failed.stderr
    assert "table1.py: error:" in failed.stderr and "is not a directory" in failed.stderr


FAKE_CLI = r'''#!/usr/bin/env bash
# stands in for patchmosaic and python: logs its arguments, writes what each stage is skipped on next time
echo "$*" >> "$LOG"
out=
while [[ $# -gt 0 ]]; do [[ $1 == --out ]] && out=$2; shift; done
[[ -z $out ]] && exit 0
[[ $out == *.md ]] && { touch "$out"; exit 0; }
mkdir -p "$out"
touch "$out/summary.json" "$out/model.pt" "$out/schedule.json" "$out/samples.npz" "$out/config.json" "$out/metrics.json" \
  "$out/leaderboard.json"
'''


def fake_cli_env(tmp_path, **extra):
    """``(env, log, out)`` for reproduce_table1.sh on mnist-resnet-zeros with the fake CLI (``extra`` overrides)."""
    fake = tmp_path / "fake"
    fake.write_text(FAKE_CLI)
    fake.chmod(0o755)
    log, out = tmp_path / "calls.log", tmp_path / "out"
    env = {"PATH": "/usr/bin:/bin", "LOG": str(log), "PM": str(fake), "PY": str(fake), "OUT": str(out),
           "MODELS": "mnist-resnet-zeros", "EVAL_SEEDS": "1000-1001", "ABLATION_STEPS": "none", **extra}
    return env, log, out


def run_reproduce(env, log):
    """Run reproduce_table1.sh with ``env`` (a fake CLI that logs to ``log``); the calls it made, the log emptied."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_table1.sh")], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = log.read_text().splitlines()
    log.unlink()
    return calls


def test_reproduce_script_stages_ablations_and_resumes(tmp_path):
    """reproduce_table1.sh with a fake CLI: a committed model skips training and calibration, runs each
    evaluation once, the calibration ablation calibrates, samples and evaluates under ablation-TAG/ with
    its flags last, and a second run starts no stage."""
    env, log, out = fake_cli_env(tmp_path, ABLATION_STEPS="50", CAL_ABLATIONS="cand31:--candidates=3-31")

    def run():
        return run_reproduce(env, log)

    calls = run()
    stages = [c.split()[0] for c in calls if not c.endswith(".md")]
    assert stages == ["sample", "evaluate", "evaluate", "evaluate", "calibrate", "calibrate", "compare", "calibrate",
                      "sample", "evaluate"], calls
    assert "--patch-sizes pretrained/mnist-resnet-zeros/schedule.json" in calls[0]  # the committed schedule
    assert [c.split("--network-steps ")[1].split()[0] for c in calls if c.startswith(("evaluate", "compare"))] == [
        "150", "20", "50", "150", "150"]
    # LS's k(sigma) and data-locality's threshold are calibrated against the network before compare uses them
    ls, dl = out / "calibrate-ls-mnist-resnet-zeros", out / "calibrate-data-locality-mnist-resnet-zeros"
    assert calls[4] == (f"calibrate --model pretrained:mnist-resnet-zeros --denoiser ls --candidates 3-21 --seeds 0-9 "
                        f"--threads 1 --out {ls} --overwrite")
    assert calls[5] == (f"calibrate --model pretrained:mnist-resnet-zeros --denoiser data-locality --seeds 0-9 "
                        f"--threads 1 --out {dl} --overwrite")
    assert calls[6].startswith("compare --model pretrained:mnist-resnet-zeros --denoisers "
                               "els,ls,ideal,wiener,data-locality,pspc,nearest --patch-sizes "
                               f"pretrained/mnist-resnet-zeros/schedule.json --ls-patch-sizes {ls}/schedule.json "
                               f"--threshold {dl}/schedule.json --seeds 1000-1001")
    assert f"--reuse {out}/els-mnist-resnet-zeros" in calls[6] and f"--out {out}/compare-mnist-resnet-zeros" in calls[6]
    abl = out / "ablation-cand31"
    assert calls[7].endswith(f"--out {abl}/calibrate-mnist-resnet-zeros --overwrite --candidates=3-31")
    assert f"--patch-sizes {abl}/calibrate-mnist-resnet-zeros/schedule.json --steps 20" in calls[8]
    assert "--steps 20" in calls[9]  # the ablation's ELS runs on the 20-step grid whatever its schedule's length
    assert f"--reuse {abl}/els-mnist-resnet-zeros" in calls[9] and f"--out {abl}/evaluate-150" in calls[9]
    tables = [c for c in calls if c.endswith(".md")]
    assert tables == [f"scripts/table1.py {out} --out {out}/table1.md",
                      f"scripts/table1.py {abl} --pretrained {abl} --out {abl}/table1.md"]
    assert [c for c in run() if not c.endswith(".md")] == []  # resumable: every stage's output exists


def test_reproduce_script_family_knobs_follow_the_compared_denoisers(tmp_path):
    """Only the listed denoisers' knobs are calibrated (pspc on request, with its own candidates); none: none."""
    base, log, _ = fake_cli_env(tmp_path)
    for extra, expected in (
        ({"COMPARE_DENOISERS": "els,pspc", "CALIBRATE_FAMILY": "ls pspc"}, [
            "calibrate --model pretrained:mnist-resnet-zeros --denoiser pspc --candidates 3-31"]),
        ({"COMPARE_DENOISERS": "els,ls", "CALIBRATE_FAMILY": "none"}, []),
    ):
        out = tmp_path / extra["CALIBRATE_FAMILY"].replace(" ", "-")
        calls = run_reproduce({**base, **extra, "OUT": str(out)}, log)
        assert [c.split(" --seeds")[0] for c in calls if c.startswith("calibrate")] == expected
        compare = next(c for c in calls if c.startswith("compare"))
        assert ("--pspc-patch-sizes" in compare) == bool(expected) and "--ls-patch-sizes" not in compare


def test_reproduce_script_training_ablations(tmp_path):
    """A training ablation trains the recipe with its flags last, calibrates the variant, reuses the model's ELS
    samples when the variant's k(sigma) and training set are the model's and samples ELS again when either is not,
    evaluates in the paper's protocol, renders its table, and a second run starts no stage."""
    env, log, out = fake_cli_env(tmp_path, COMPARE_DENOISERS="none",
                                 TRAIN_ABLATIONS="same:--steps=8000 other:--width=64 data:--n-train=10000")
    same, other, data = out / "ablation-same", out / "ablation-other", out / "ablation-data"
    # "same" and "data" calibrate to the committed schedule (written reformatted: only the sizes count); "same"
    # trains on the committed model's training set, "data" on 10,000 images
    committed = json.loads((ROOT / "pretrained" / "mnist-resnet-zeros" / "schedule.json").read_text())
    config = json.loads((ROOT / "pretrained" / "mnist-resnet-zeros" / "config.json").read_text())
    for abl, n_images in ((same, config["n_images"]), (data, 10000)):
        write_json(abl / "calibrate-mnist-resnet-zeros" / "schedule.json", {"patch_sizes": committed["patch_sizes"]})
        write_json(abl / "train-mnist-resnet-zeros" / "config.json", {**config, "n_images": n_images})

    def run():
        return run_reproduce(env, log)

    skip = ("evaluate --model pretrained", "sample --machine els --like pretrained")  # the committed model's stages
    calls = [c for c in run() if not c.startswith(skip)]
    stages = [c.split()[0] for c in calls if not c.endswith(".md")]
    assert stages == ["train", "evaluate", "train", "calibrate", "sample", "evaluate", "train", "sample",
                      "evaluate"], calls
    assert calls[0].startswith("train --dataset mnist --arch resnet --padding zeros --width 32 --depth 4")
    assert calls[0].endswith(f"--steps 4000 --threads 1 --out {same}/train-mnist-resnet-zeros --steps=8000")
    # same k(sigma) and training set: the model's own ELS samples, the variant network
    assert calls[1].startswith(f"evaluate --model {same}/train-mnist-resnet-zeros --machine els --patch-sizes "
                               f"{same}/calibrate-mnist-resnet-zeros/schedule.json --steps 20")
    assert f"--network-steps 150 --reuse {out}/els-mnist-resnet-zeros " in calls[1]
    assert calls[2].endswith(f"--out {other}/train-mnist-resnet-zeros --width=64")
    assert calls[3].startswith(f"calibrate --model {other}/train-mnist-resnet-zeros --machine els --candidates 3-21")
    assert calls[4].startswith(f"sample --machine els --like {other}/train-mnist-resnet-zeros --patch-sizes "
                               f"{other}/calibrate-mnist-resnet-zeros/schedule.json --steps 20")
    assert f"--reuse {other}/els-mnist-resnet-zeros " in calls[5]
    # same k(sigma), another training set: ELS sampled again on the variant's data
    assert calls[7].startswith(f"sample --machine els --like {data}/train-mnist-resnet-zeros --patch-sizes "
                               f"{data}/calibrate-mnist-resnet-zeros/schedule.json --steps 20")
    assert f"--reuse {data}/els-mnist-resnet-zeros " in calls[8]
    tables = [c for c in calls if c.endswith(".md")]
    assert tables[1:] == [f"scripts/table1.py {abl} --pretrained {abl} --out {abl}/table1.md"
                          for abl in (same, other, data)]
    assert [c for c in run() if not c.endswith(".md")] == []


def test_reproduce_script_training_ablation_schedule(tmp_path):
    """ABLATION_SCHEDULE gives the training variants one k(sigma) instead of calibrating them ("model": the model's
    committed schedule, whose ELS samples are not reused for another training set; or any --patch-sizes value)."""
    base, log, out = fake_cli_env(tmp_path, COMPARE_DENOISERS="none", TRAIN_ABLATIONS="n10k:--n-train=10000")
    schedule = "pretrained/mnist-resnet-zeros/schedule.json"
    for value, sizes in (("model", schedule), ("mnist-resnet-zeros", "mnist-resnet-zeros")):
        abl = out / value / "ablation-n10k"
        calls = [c for c in run_reproduce({**base, "OUT": str(out / value), "ABLATION_SCHEDULE": value}, log)
                 if f"{abl}/" in c and not c.endswith(".md")]
        assert [c.split()[0] for c in calls] == ["train", "sample", "evaluate"], calls
        assert calls[1].startswith(f"sample --machine els --like {abl}/train-mnist-resnet-zeros --patch-sizes "
                                   f"{sizes} --steps 20")
        assert calls[2].startswith(f"evaluate --model {abl}/train-mnist-resnet-zeros --machine els --patch-sizes "
                                   f"{sizes} --steps 20")
        assert f"--reuse {abl}/els-mnist-resnet-zeros " in calls[2]


def test_reproduce_script_machine_step_ablations(tmp_path):
    """MACHINE_ABLATIONS samples ELS with each step count on the model's own k(sigma) under ablation-machineN/,
    evaluates it against the network's 150 steps with the same machine steps, renders its table with the
    committed schedules, and a second run starts no stage."""
    env, log, out = fake_cli_env(tmp_path, COMPARE_DENOISERS="none", MACHINE_ABLATIONS="150 50")
    schedule = "pretrained/mnist-resnet-zeros/schedule.json"
    calls = [c for c in run_reproduce(env, log) if "ablation-machine" in c]
    stages, tables = calls[:4], calls[4:]  # each N's sample and evaluate, then each N's table
    for i, n in enumerate((150, 50)):
        (sample, evaluate), table = stages[2 * i : 2 * i + 2], tables[i]
        abl = out / f"ablation-machine{n}"
        assert sample == (f"sample --machine els --like pretrained:mnist-resnet-zeros --patch-sizes {schedule} "
                          f"--steps {n} --seeds 1000-1001 --threads 1 --out {abl}/els-mnist-resnet-zeros")
        assert evaluate.startswith(f"evaluate --model pretrained:mnist-resnet-zeros --machine els --patch-sizes "
                                   f"{schedule} --steps {n} --seeds 1000-1001 --network-steps 150 --reuse "
                                   f"{abl}/els-mnist-resnet-zeros ")
        assert evaluate.endswith(f"--out {abl}/evaluate-150-mnist-resnet-zeros --overwrite")
        assert table == f"scripts/table1.py {abl} --out {abl}/table1.md"
    assert len(calls) == 6, calls
    assert [c for c in run_reproduce(env, log) if not c.endswith(".md")] == []
