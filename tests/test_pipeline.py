"""The demo's pipeline on bundled data: sample --provenance, explain, report, and the explorer in Chromium."""

from __future__ import annotations

import json

import numpy as np
from click.testing import CliRunner

from browser import launch_chromium
from patchmosaic.cli import main


def _cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_sample_explain_report_on_bundled_mnist(tmp_path):
    run, report = tmp_path / "run", tmp_path / "report"
    _cli("sample", "--dataset", "mnist", "--n-train", 40, "--size", "native", "--machine", "els", "--padding",
         "zeros", "--patch-sizes", "3,5,5", "--steps", 3, "--seeds", "0-1", "--provenance", "--out", run)
    _cli("explain", run)
    _cli("report", run, "--out", report)
    explain = json.loads((run / "explain.json").read_text())
    assert [r["seed"] for r in explain["per_seed"]] == [0, 1]
    html = (report / "index.html").read_text()
    for fragment in ("explain_mosaic.png", "provenance", "Per seed"):
        assert fragment in html

    prov = np.load(run / "provenance.npz")
    single = (prov["count"][0, ..., 0] == 1) & (prov["weight"][0, ..., 0] > 0.05)  # a clear single source
    y, x = (int(v) for v in np.argwhere(single)[0])
    H, W = prov["index"].shape[1:3]
    with launch_chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto((report / "index.html").resolve().as_uri())
        page.wait_for_selector('.explorer[data-ready="1"]', timeout=20_000)
        canvas = page.locator("canvas.sample").first
        box = canvas.bounding_box()
        canvas.click(position={"x": (x + 0.5) * box["width"] / W, "y": (y + 0.5) * box["height"] / H})
        first = page.locator(".explorer .panel li.entry").first
        assert first.get_attribute("data-index") == str(int(prov["index"][0, y, x, 0]))
        assert abs(float(first.get_attribute("data-weight")) - float(prov["weight"][0, y, x, 0])) <= 6e-5
        assert f"pixel (y, x) = ({y}, {x})" in page.locator(".explorer .panel").first.inner_text()
        assert not errors, errors
