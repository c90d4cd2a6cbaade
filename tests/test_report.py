"""``patchmosaic report``: the HTML page, its input checks, the CLI, and the mosaic explorer in Chromium.

Run directories are built here from 20 bundled MNIST digits at their native
28 x 28 with a synthetic ``provenance.npz`` that follows the format of
``patchmosaic sample --provenance`` (see :func:`patchmosaic.provenance.save_provenance`).
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from pathlib import Path

import numpy as np

from patchmosaic.schedules import CosineSchedule
import pytest
from browser import launch_chromium
from click.testing import CliRunner
from PIL import Image

from patchmosaic.cli import main
from patchmosaic.data import load_dataset
from patchmosaic.evaluation import save_comparison, save_scatter, summarize
from patchmosaic.report import PROVENANCE_FILE, REPORT_FILE, build_report
from patchmosaic.runs import CONFIG_FILE, save_grid, save_samples, write_config

N_TRAIN, B, M, S = 20, 8, 5, 4  # training images, samples, top entries per pixel, sampling steps
C, H, W = 1, 28, 28
PATCH_SIZES = [3, 3, 5, 5]  # entry i-1 at t = i/4
# One pixel of sample 0 with hand-set provenance, checked in the browser.
Y0, X0 = 14, 10
PIXEL_INDEX = [7, 3, 12, -1, -1]
PIXEL_SOURCE = [(14, 10), (0, 0), (20, 5), (0, 0), (0, 0)]
PIXEL_WEIGHT = [0.8123, 0.15, 3.77e-5, 0.0, 0.0]  # a tiny weight is not shown as 0.0000
PIXEL_COUNT = [1, 40, 1, 1, 1]
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def _training_images(n_train: int = N_TRAIN) -> np.ndarray:
    return load_dataset("mnist", n_train=n_train, size=None).images.numpy()  # [n, 1, 28, 28]


def synthetic_provenance(seeds: list[int], *, n_train: int = N_TRAIN, seed: int = 0) -> dict[str, np.ndarray]:
    """A provenance archive in the exact format of ``sample --provenance``, indices into ``n_train`` images."""
    rng = np.random.default_rng(seed)
    nb = len(seeds)
    index = rng.integers(0, n_train, (nb, H, W, M))  # [B, H, W, m]
    empty = rng.random((nb, H, W)) < 0.5  # [B, H, W]: the last slot is empty at half the pixels
    index[..., -1] = np.where(empty, -1, index[..., -1])
    source = rng.integers(0, H, (nb, H, W, M, 2))  # [B, H, W, m, 2]
    weight = np.sort(rng.random((nb, H, W, M)), axis=-1)[..., ::-1]  # [B, H, W, m], descending
    weight[..., -1] = np.where(empty, 0.0, weight[..., -1])
    weight = weight / weight.sum(-1, keepdims=True)
    count = np.where(rng.random((nb, H, W, M)) < 0.2, 40, 1)  # [B, H, W, m]
    index[0, Y0, X0], source[0, Y0, X0] = PIXEL_INDEX, PIXEL_SOURCE
    weight[0, Y0, X0], count[0, Y0, X0] = PIXEL_WEIGHT, PIXEL_COUNT
    w = weight.astype(np.float32)
    n_eff = 1.0 / (w.astype(np.float64) ** 2).sum(-1)  # [B, H, W]
    entropy = -(w * np.log(np.where(w > 0, w, 1.0))).sum(-1)  # [B, H, W]
    t = np.arange(S, 0, -1) / S  # [S] from t = 1 down
    return {
        "seeds": np.asarray(seeds, dtype=np.int64),
        "top": np.int64(M),
        "patch_size": np.int64(PATCH_SIZES[0]),  # k of the final step, t = 1/4
        "index": index.astype(np.int64),
        "source": source.astype(np.int64),
        "weight": w,
        "count": count.astype(np.int64),
        "n_eff": np.stack([n_eff * (1 + s) for s in range(S)][::-1]).astype(np.float32),  # [S, B, H, W]
        "entropy": np.stack([entropy] * S).astype(np.float32),  # [S, B, H, W]
        "t": t.astype(np.float64),
        "step_patch_sizes": np.array([PATCH_SIZES[round(ti * S) - 1] for ti in t], dtype=np.int64),
    }


def make_run(path: Path, *, provenance: bool = True, **overrides) -> Path:
    """A ``sample`` run directory: grid.png, samples.npz, config.json (+ provenance.npz)."""
    path.mkdir(parents=True)
    train = _training_images()
    rng = np.random.default_rng(1)
    seeds = list(range(B))
    samples = np.clip(train[rng.integers(0, N_TRAIN, B)] + 0.1 * rng.standard_normal((B, C, H, W)), -1, 1)
    save_grid(samples, path / "grid.png")
    save_samples(path / "samples.npz", samples.astype(np.float32), seeds)
    config = {
        "dataset": "mnist", "dataset_name": "mnist", "n_train": N_TRAIN, "size": "native", "image_shape": [C, H, W],
        "machine": "els", "padding": "zeros", "patch_sizes": PATCH_SIZES, "steps": S, "seeds": seeds,
        "dtype": "float32", "label": None, **overrides,
    }
    write_config(path / CONFIG_FILE, config, argv=["patchmosaic", "sample", "--out", str(path)])
    if provenance:
        np.savez(path / PROVENANCE_FILE, **synthetic_provenance(seeds))
    return path


def rewrite_provenance(run: Path, **changes: np.ndarray) -> None:
    with np.load(run / PROVENANCE_FILE) as archive:
        data = {key: archive[key] for key in archive.files}
    data.update(changes)
    np.savez(run / PROVENANCE_FILE, **data)


def explorer_data(page: str, data_id: str = "run-1-provenance") -> dict:
    match = re.search(rf'<script type="application/json" id="{data_id}">(.*?)</script>', page, re.S)
    assert match, f"no explorer data block {data_id}"
    return json.loads(match.group(1))


def unpack(packed: dict) -> np.ndarray:
    """Decode one packed array as the page's script does."""
    dtype = {"uint8": "u1", "int16": "<i2", "int32": "<i4", "float32": "<f4", "float64": "<f8"}[packed["dtype"]]
    raw = zlib.decompress(base64.b64decode(packed["data"]))
    return np.frombuffer(raw, dtype=dtype).reshape(packed["shape"])


def assert_offline(page: str) -> None:
    """No resource the browser would fetch from the network."""
    lowered = page.lower()
    for needle in ('src="http', "src='http", '<link', 'href="http', "url(http", "@import", 'src="//'):
        assert needle not in lowered, needle


# ------------------------------------------------------------------ the page


def test_sample_run_report(tmp_path):
    run = make_run(tmp_path / "els-run")
    out = tmp_path / "report"
    path = build_report([run], out)
    assert path == out / REPORT_FILE
    assert sorted(p.name for p in out.iterdir()) == [REPORT_FILE]  # one file, nothing else needed
    page = path.read_text(encoding="utf-8")
    assert_offline(page)
    assert path.stat().st_size < 5 * 2**20
    for fragment in ("els-run", "sample run", "<th>machine</th><td>els</td>", "<th>padding</th><td>zeros</td>",
                     "<th>dataset</th><td>mnist</td>", "<th>n_train</th><td>20</td>", "<th>steps</th><td>4</td>",
                     "<th>seeds</th><td>0-7 (8)</td>", "<h3>Samples</h3>", "<h3>Locality schedule</h3>",
                     "k(t), lowest noise first: 3,3,5,5; entry i-1 is used at t = i/4", "<h3>Mosaic explorer</h3>",
                     'class="explorer"', "patchmosaic sample --out"):
        assert fragment in page, fragment
    assert page.count('<canvas class="sample"') == B
    assert "<h3>Evaluation</h3>" not in page and "<h3>Explain</h3>" not in page
    grid, schedule = re.findall(r'<img class="(?:grid|plot)" src="data:image/png;base64,([^"]+)"', page)
    assert base64.b64decode(grid) == (run / "grid.png").read_bytes()
    assert base64.b64decode(schedule).startswith(b"\x89PNG")


def test_explorer_data_matches_the_run(tmp_path):
    """The embedded arrays decode to the provenance, the samples and exactly the referenced training images."""
    run = make_run(tmp_path / "run")
    data = explorer_data(build_report([run], tmp_path / "out").read_text(encoding="utf-8"))
    with np.load(run / PROVENANCE_FILE) as archive:
        prov = {key: archive[key] for key in archive.files}
    assert (data["H"], data["W"], data["C"], data["m"], data["patch_size"]) == (H, W, C, M, 3)
    # make_run writes the provenance format of older runs (times "t"): they load as cosine-grid sigmas
    assert data["seeds"] == list(range(B)) and data["k_final"] == 3
    assert data["sigma_final"] == pytest.approx(float(CosineSchedule().sigma(0.25)))
    for key in ("index", "source", "weight", "count"):
        np.testing.assert_array_equal(unpack(data[key]), prov[key])
    np.testing.assert_array_equal(unpack(data["n_eff"]), prov["n_eff"][-1])
    np.testing.assert_array_equal(unpack(data["entropy"]), prov["entropy"][-1])
    referenced = np.unique(prov["index"][prov["index"] >= 0])
    assert data["train_ids"] == referenced.tolist()
    train = np.rint((_training_images() + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)  # [N, H, W, C]
    np.testing.assert_array_equal(unpack(data["train"]), train[referenced])
    labels = load_dataset("mnist", n_train=N_TRAIN, size=None).labels.numpy()
    assert data["train_labels"] == labels[referenced].tolist()
    samples = np.load(run / "samples.npz")["images"]
    np.testing.assert_array_equal(unpack(data["samples"]),
                                  np.rint((samples + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1))


def test_explorer_only_embeds_referenced_images(tmp_path):
    run = make_run(tmp_path / "run")
    prov = synthetic_provenance(list(range(B)))
    index = np.where(prov["index"] >= 0, prov["index"] % 4, -1)  # images 0..3 only
    index[0, Y0, X0] = [0, 3, 2, -1, -1]
    rewrite_provenance(run, index=index)
    data = explorer_data(build_report([run], tmp_path / "out").read_text(encoding="utf-8"))
    assert data["train_ids"] == [0, 1, 2, 3]
    assert unpack(data["train"]).shape == (4, H, W, C)


def test_provenance_seeds_follow_the_provenance_order(tmp_path):
    run = make_run(tmp_path / "run")
    order = [3, 0, 5]
    prov = synthetic_provenance(order)
    np.savez(run / PROVENANCE_FILE, **prov)
    data = explorer_data(build_report([run], tmp_path / "out").read_text(encoding="utf-8"))
    samples = np.load(run / "samples.npz")["images"][order]
    assert data["seeds"] == order
    np.testing.assert_array_equal(unpack(data["samples"]),
                                  np.rint((samples + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1))


def test_machine_without_patches(tmp_path):
    run = make_run(tmp_path / "ideal", provenance=False, machine="ideal", patch_sizes=None)
    (run / "grid.png").unlink()  # re-rendered from samples.npz
    page = build_report([run], tmp_path / "out").read_text(encoding="utf-8")
    assert "no patch sizes: machine &#x27;ideal&#x27; has no patches." in page
    assert "samples.npz: seeds 0-7 (8) (re-rendered)" in page
    assert "Mosaic explorer" not in page


def test_evaluation_directory(tmp_path):
    """A directory as `patchmosaic evaluate` writes it: metrics.json (with its config), figures, samples_*.npz."""
    ev = tmp_path / "evaluate-mnist"
    ev.mkdir()
    train = _training_images()
    rng = np.random.default_rng(2)
    seeds = [0, 1, 2, 3]
    images = {name: np.clip(train[:4] + scale * rng.standard_normal((4, C, H, W)), -1, 1).astype(np.float32)
              for name, scale in (("network", 0.1), ("els", 0.2), ("ideal", 0.8))}
    summary = summarize(images, seeds, train_images=train, resamples=50)
    per = summary["per_seed"]
    save_scatter(ev / "scatter.png", [r["pearson_r_els"] for r in per], [r["pearson_r_ideal"] for r in per])
    save_comparison(ev / "comparison.png", [(n, a) for n, a in images.items()], seeds)
    for name, arr in images.items():
        save_samples(ev / f"samples_{name}.npz", arr, seeds)
    config = {"machine": "els", "baseline": "ideal", "patch_sizes": PATCH_SIZES, "steps": S, "seeds": seeds,
              "training_set": {"dataset": "mnist", "n_train": N_TRAIN, "image_size": None, "padding": "zeros"}}
    write_config(ev / "metrics.json", {"config": config, **summary}, argv=["patchmosaic", "evaluate"])
    page = build_report([ev], tmp_path / "out").read_text(encoding="utf-8")
    assert_offline(page)
    for fragment in ("evaluation", "<th>padding</th><td>zeros</td>", "<th>dataset</th><td>mnist</td>",
                     "<h3>Evaluation</h3>", "scatter.png", "comparison.png", "<h4>Aggregates</h4>",
                     "<h4>Per seed (4)</h4>",
                     "ELS beats IS on", "nearest_train_index", "pearson_r_els", f"{per[2]['pearson_r_els']:.4f}",
                     f"{summary['aggregates']['els']['pearson_r']['median']:.4f}", "samples_network.npz",
                     "<h3>Locality schedule</h3>"):
        assert fragment in page, fragment
    assert page.index("samples_network.npz") < page.index("samples_els.npz")  # the reference first
    assert page.count("data:image/png;base64,") == 3 + 1 + 2  # grids, schedule, scatter + comparison


def test_explain_files(tmp_path):
    run = make_run(tmp_path / "run", provenance=False)
    explain = {"machine": "els", "mean_n_eff": 3.25, "n_pixels": 6272,
               "displacement": {"mean": 1.5, "by_step": {"t=1": 2}}, "steps": [1.0, 0.5]}
    (run / "explain.json").write_text(json.dumps(explain))
    Image.new("L", (8, 8), 128).save(run / "explain_mosaic.png")
    Image.new("L", (8, 8), 64).save(run / "explain_neff.png")
    page = build_report([run], tmp_path / "out").read_text(encoding="utf-8")
    for fragment in ("<h3>Explain</h3>", "explain_mosaic.png", "explain_neff.png", "<th>mean_n_eff</th><td>3.2500</td>",
                     "<th>n_pixels</th><td>6272</td>", "<th>displacement.mean</th><td>1.5000</td>",
                     "<th>displacement.by_step.t=1</th><td>2</td>", "<th>steps</th><td>[1, 0.5000]</td>"):
        assert fragment in page, fragment
    assert "explain_displacement.png" not in page


def explain_payload(seeds: list[int]) -> dict:
    """An ``explain.json`` with the structure that :func:`patchmosaic.explain.explain_run` writes."""
    per_seed = [{"seed": s, "label": None, "single_source_fraction": 0.25 + s / 100, "images_for_90pct": 10 + s,
                 "mean_displacement_px": 1.5 * s, "final_n_eff_median": 1000.0 * (s + 1), "nn_shift": [s, 2 * s]}
                for s in seeds]
    return {
        "run": "runs/x", "machine": "els", "padding": "zeros", "n_train": N_TRAIN, "final_patch_size": 3,
        "provenance_top": M, "tolerance": 0.02,
        "definitions": {"single_source_fraction": "pixels whose dominant entry is one patch",
                        "displacement": "q - p of the dominant patch, in pixels"},
        "summary": {"median_single_source_fraction": 0.285, "median_images_for_90pct": 13.5},
        "per_seed": per_seed,
        "n_eff_over_time": {
            "t": [1.0, 0.75, 0.5, 0.25], "patch_size": [5, 5, 3, 3],
            "median_n_eff": [[12345.678 + s, 800.25, 10.0, 2.5] for s in seeds],
            "median_entropy": [[9.5, 7.25, 2.0, 1.0] for _ in seeds],
        },
        "figures": {"mosaic": "explain_mosaic.png", "displacement": "explain_displacement.png",
                    "n_eff": "explain_neff.png"},
    }


def test_explain_json_of_explain_run(tmp_path):
    """The payload of `patchmosaic explain`: summary and per-seed tables, definitions, n_eff_over_time summarised."""
    run = make_run(tmp_path / "run", provenance=False)
    seeds = [0, 1, 2]
    (run / "explain.json").write_text(json.dumps(explain_payload(seeds)))
    for name in ("explain_mosaic.png", "explain_neff.png"):  # explain_displacement.png is missing
        Image.new("L", (8, 8), 128).save(run / name)
    page = build_report([run], tmp_path / "out").read_text(encoding="utf-8")
    section = page[page.index("<h3>Explain</h3>"):page.index("</section>", page.index("<h3>Explain</h3>"))]
    # settings: the top-level scalars
    for fragment in ("<th>machine</th><td>els</td>", "<th>provenance_top</th><td>5</td>",
                     "<th>tolerance</th><td>0.0200</td>"):
        assert fragment in section, fragment
    # summary: a small metric / median table, the median_ prefix in the header, definitions as tooltips
    assert "<h4>Summary</h4>" in section and "<th>median over 3 seeds</th>" in section
    assert ('<td class="hinted" title="pixels whose dominant entry is one patch">single_source_fraction</td>'
            "<td>0.2850</td>") in section
    assert "<td>images_for_90pct</td><td>13.5000</td>" in section
    # definitions: a definition list
    assert "<h4>Definitions</h4>" in section
    assert "<dt>displacement</dt><dd>q - p of the dominant patch, in pixels</dd>" in section
    # per_seed: one row per seed, one column per key (seed, label first), not "[list of 3 items]"
    assert "<h4>Per seed (3)</h4>" in section and "[list of" not in section
    table = re.search(r'<h4>Per seed \(3\)</h4><div class="scroll"><table>(.*?)</table>', section, re.S).group(1)
    header = re.findall(r"<th[^>]*>([^<]*)</th>", table)
    assert header == ["seed", "label", "single_source_fraction", "images_for_90pct", "mean_displacement_px",
                      "final_n_eff_median", "nn_shift"]
    assert 'title="q - p of the dominant patch, in pixels">mean_displacement_px</th>' in table  # hint by substring
    rows = re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1])
    assert len(rows) == 3
    assert re.findall(r"<td>([^<]*)</td>", rows[2]) == ["2", "—", "0.2700", "12", "3", "3000", "[2, 4]"]
    # n_eff_over_time: a sentence and collapsed step x seed tables, never one key path per number
    assert "n_eff_over_time." not in section
    assert "at each of the 4 sampling steps (t = 1 to 0.25, k = 5 to 3) for 3 samples; plotted in explain_neff.png" \
        in section
    assert "<summary>median_n_eff per step and sample</summary>" in section
    assert "<summary>median_entropy per step and sample</summary>" in section
    neff = section[section.index("median_n_eff per step"):section.index("median_entropy per step")]
    assert "<th>t</th><th>k</th><th>seed 0</th><th>seed 1</th><th>seed 2</th>" in neff
    assert "<tr><td>1</td><td>5</td><td>12,346</td><td>12,347</td><td>12,348</td></tr>" in neff
    assert "<tr><td>0.75</td><td>5</td><td>800.2</td>" in neff
    # figures: embedded, not listed as key paths; the one explain.json names but the directory lacks is reported
    assert "figures.mosaic" not in section
    assert "names figures that are not in the run directory: explain_displacement.png" in section
    assert section.count('<img class="zoomable"') == 2
    assert section.index("explain_neff.png</figcaption>") < section.index("explain_mosaic.png</figcaption>")
    assert "<figcaption>explain_displacement.png</figcaption>" not in section


def test_explain_json_unknown_keys_fall_back(tmp_path):
    """Keys the report does not know keep the generic layout; an odd n_eff_over_time is summarised, not dumped."""
    run = make_run(tmp_path / "run", provenance=False)
    explain = {"machine": "els", "extra": {"a": {"b": 1}}, "rows": [{"seed": 4, "x": 0.5}],
               "n_eff_over_time": {"steps": 3, "<b>": 1}, "summary": {"n": 2, "nested": {"no": 1}}}
    (run / "explain.json").write_text(json.dumps(explain))
    page = build_report([run], tmp_path / "out").read_text(encoding="utf-8")
    for fragment in ("<th>extra.a.b</th><td>1</td>", "<h4>rows (1)</h4>", "<th>seed</th><th>x</th>",
                     "<td>4</td><td>0.5000</td>", "Not shown as a table (keys steps, &lt;b&gt;)",
                     "<th>summary.n</th><td>2</td>", "<th>summary.nested.no</th><td>1</td>"):
        assert fragment in page, fragment
    assert "<h4>Summary</h4>" not in page and "<h4>Per seed" not in page


def test_several_runs(tmp_path):
    runs = [make_run(tmp_path / "a"), make_run(tmp_path / "b")]
    page = build_report(runs, tmp_path / "out").read_text(encoding="utf-8")
    assert '<a href="#run-1">a</a>' in page and '<a href="#run-2">b</a>' in page
    assert explorer_data(page, "run-1-provenance") and explorer_data(page, "run-2-provenance")


# ------------------------------------------------------------------ bad inputs and the output directory


def test_refuses_a_non_empty_out_and_keeps_user_files(tmp_path):
    run = make_run(tmp_path / "run", provenance=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_report([run], out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    build_report([run], out, overwrite=True)
    build_report([run], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [REPORT_FILE, "notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError, match="not a directory"):
        build_report([run], tmp_path / "file", overwrite=True)


def test_bad_run_directories(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="no run directories"):
        build_report([], out)
    with pytest.raises(FileNotFoundError, match="run directory not found: .*missing"):
        build_report([tmp_path / "missing"], out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config\.json"):
        build_report([tmp_path / "empty"], out)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        build_report([tmp_path / "afile"], out)
    broken = make_run(tmp_path / "broken", provenance=False)
    (broken / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        build_report([broken], out)
    assert not out.exists()  # nothing is written before every input has been read


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"dataset": "no-such-dataset"}, r"bad-run: cannot load its training set \(dataset='no-such-dataset'"),
        ({"image_shape": [1, 32, 32]}, r"bad-run: the dataset 'mnist' now gives \d+ images of shape \[1, 28, 28\], "
                                       r"but the run used \d+ of \[1, 32, 32\]"),
        ({"n_train": 10}, r"training image indices must lie in -1\.\.9"),
    ],
)
def test_explorer_training_set_errors(tmp_path, overrides, message):
    run = make_run(tmp_path / "bad-run", **overrides)
    with pytest.raises(ValueError, match=message):
        build_report([run], tmp_path / "out")


def test_bad_provenance(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "out"
    prov = synthetic_provenance(list(range(B)))
    rewrite_provenance(run, source=prov["source"][..., :1])
    with pytest.raises(ValueError, match=r"source has shape \(8, 28, 28, 5, 1\), expected \(8, 28, 28, 5, 2\)"):
        build_report([run], out)
    np.savez(run / PROVENANCE_FILE, **{k: v for k, v in prov.items() if k != "count"})
    with pytest.raises(ValueError, match=r"provenance file lacks \['count'\]"):
        build_report([run], out)
    np.savez(run / PROVENANCE_FILE, **{**prov, "seeds": np.arange(10, 10 + B)})
    with pytest.raises(ValueError, match=r"has seeds \[10, 11, .*samples\.npz does not"):
        build_report([run], out)
    source = prov["source"].copy()
    source[0, 0, 0, 0] = (H, 0)
    np.savez(run / PROVENANCE_FILE, **{**prov, "source": source})
    with pytest.raises(ValueError, match=r"must lie inside the 28x28 images"):
        build_report([run], out)
    (run / "samples.npz").unlink()
    np.savez(run / PROVENANCE_FILE, **prov)
    with pytest.raises(ValueError, match=r"samples\.npz is missing"):
        build_report([run], out)


# ------------------------------------------------------------------ command line


def test_cli(tmp_path):
    run = make_run(tmp_path / "run", provenance=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"wrote {out / REPORT_FILE}" in result.output and "file://" in result.output
    again = CliRunner().invoke(main, ["report", str(run), "--out", str(out)])
    assert again.exit_code != 0 and "Error:" in again.output and "--overwrite" in again.output
    assert "Traceback" not in again.output
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code != 0 and "Error: run directory not found" in missing.output
    none = CliRunner().invoke(main, ["report", "--out", str(tmp_path / "o3")])
    assert none.exit_code != 0 and "RUN_DIR" in none.output


# ------------------------------------------------------------------ the explorer in a browser


def test_explorer_in_chromium(tmp_path):
    """Click a pixel: the panel lists its hand-set sources; hover previews; no console errors, no network."""
    run = make_run(tmp_path / "run")
    (run / "explain.json").write_text(json.dumps(explain_payload(list(range(B)))))
    for name in ("explain_mosaic.png", "explain_neff.png"):
        Image.new("L", (2000, 40), 128).save(run / name)  # wider than the page: shown fitted until clicked
    path = build_report([run], tmp_path / "report")
    with launch_chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.on("request", lambda req: requests.append(req.url))
        page.goto(path.resolve().as_uri())
        page.wait_for_selector('.explorer[data-ready="1"]', timeout=20_000)

        canvas = page.locator("canvas.sample").first
        box = canvas.bounding_box()

        def at(y: int, x: int) -> dict[str, float]:
            return {"x": (x + 0.5) * box["width"] / W, "y": (y + 0.5) * box["height"] / H}

        canvas.click(position=at(Y0, X0))
        panel = page.locator(".explorer .panel").first
        entries = panel.locator("li.entry")
        assert entries.count() == 3  # the two empty slots (-1) are skipped
        first = entries.first
        assert first.get_attribute("data-index") == "7"
        assert first.get_attribute("data-weight") == "0.8123"
        text = panel.inner_text()
        n_eff = 1.0 / float((np.float32(PIXEL_WEIGHT).astype(np.float64) ** 2).sum())
        for fragment in ("Sample 1 · seed 0", "pinned", f"pixel (y, x) = ({Y0}, {X0})", "train #7", "w = 0.8123",
                         "centre (qy, qx) = (14, 10)", "train #3", "w = 0.1500", "w = 3.77e-5",
                         "constant-patch group of 40 identical patches; w is their total",
                         f"N_eff = {np.float32(n_eff):.2f}", "entropy = ", "final step sigma = 0.411, k = 3"):
            assert fragment in text, (fragment, text)
        assert text.count("constant-patch group") == 1  # counts of 1 are not shown

        canvas.hover(position=at(3, 4))  # hovering previews another pixel ...
        assert "pixel (y, x) = (3, 4)" in panel.inner_text() and "preview" in panel.inner_text()
        page.mouse.move(1, 1)  # ... and leaving the canvas returns to the pinned one
        assert f"pixel (y, x) = ({Y0}, {X0})" in panel.inner_text()

        ARTIFACTS.mkdir(exist_ok=True)
        page.locator(".explorer").first.screenshot(path=str(ARTIFACTS / "report-explorer.png"))
        zoomable = page.locator("img.zoomable")  # explain figures: a click toggles full size
        assert zoomable.count() == 2
        fitted = zoomable.first.bounding_box()["width"]
        zoomable.first.click()
        assert "full" in (zoomable.first.get_attribute("class") or "")
        assert fitted < 1400 and zoomable.first.bounding_box()["width"] == 2000
        page.select_option(".explorer select.view", "n_eff")
        assert "N_eff" in page.locator(".explorer .legend").first.inner_text()
        assert not errors, errors
        assert requests and all(url.startswith(("file:", "data:")) for url in requests), requests
