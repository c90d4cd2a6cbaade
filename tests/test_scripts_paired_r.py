"""scripts/paired_r.py on copies of a real ``evaluate`` metrics.json with constructed per-seed r."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL = json.loads((ROOT / "tests" / "fixtures" / "evaluate_metrics_2seeds.json").read_text())
SPEC = importlib.util.spec_from_file_location("paired_r", ROOT / "scripts" / "paired_r.py")
paired_r = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(paired_r)


def write_run(path, r_by_seed):
    """The real metrics.json with its per-seed rows replaced by one per seed with the given ELS r."""
    data = copy.deepcopy(REAL)
    row = data["per_seed"][0]
    data["per_seed"] = [{**row, "seed": s, "pearson_r_els": r} for s, r in r_by_seed.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_paired_differences_wins_and_medians(tmp_path, capsys):
    seeds = range(1000, 1009)
    base = {s: 0.90 + 0.01 * i for i, s in enumerate(seeds)}  # 0.90 .. 0.98, median 0.94
    better = {s: r + (0.02 if s != 1004 else -0.01) for s, r in base.items()}  # 8 of 9 higher
    partial = {**{s: base[s] - 0.05 for s in (1000, 1001, 1002)}, 2000: 0.5}  # 3 seeds shared
    files = [write_run(tmp_path / n / "metrics.json", r) for n, r in
             (("base", base), ("better", better), ("partial", partial))]
    assert paired_r.main([*map(str, files), "--labels", "4000,8000,other", "--out", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "t.md").read_text() == out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()[2:]}
    own = paired_r.bootstrap_median(list(base.values()))
    assert rows["4000"][1:] == ["9", f"0.940 [{own['ci_low']:.3f}, {own['ci_high']:.3f}]", "–", "–", "0.900 / 44%"]
    want = paired_r.bootstrap_median(np.array([better[s] - base[s] for s in seeds]))
    assert rows["8000"][3] == f"+0.020 [{want['ci_low']:+.3f}, {want['ci_high']:+.3f}]" and rows["8000"][4] == "8/9"
    assert rows["other"][1] == "4" and rows["other"][3].startswith("-0.050 ") and rows["other"][4] == "0/3"
    assert rows["other"][5] == "0.500 / 0%" and rows["8000"][5] == "0.920 / 56%"  # 5 of 9 at >= 0.95


def test_bad_inputs_are_named(tmp_path):
    base = write_run(tmp_path / "a" / "metrics.json", {1: 0.9, 2: 0.8})
    other = write_run(tmp_path / "b" / "metrics.json", {3: 0.9})
    with pytest.raises(SystemExit, match="shares no seed"):
        paired_r.main([str(base), str(other)])
    junk = tmp_path / "c.json"
    junk.write_text(json.dumps({"per_seed": [{"seed": 1}]}))
    with pytest.raises(SystemExit, match="not an `evaluate` metrics.json"):
        paired_r.main([str(base), str(junk)])
    with pytest.raises(SystemExit, match="cannot read"):
        paired_r.main([str(base), str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit):
        paired_r.main([str(base)])  # nothing to pair with
