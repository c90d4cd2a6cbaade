"""`make test` installs no system packages; without Chromium the browser test skips, naming `make browser`."""

import re
from pathlib import Path

import pytest
from browser import launch_chromium

ROOT = Path(__file__).resolve().parents[1]


def test_make_test_does_not_install_the_browser():
    makefile = (ROOT / "Makefile").read_text()
    prerequisites = re.search(r"^test:(.*)$", makefile, re.M).group(1).split()
    assert prerequisites == ["install"]
    assert "install_chromium" in re.search(r"^browser:\n((?:\t.*\n)+)", makefile, re.M).group(1)
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("make browser") < ci.index("make test")  # CI still runs the browser test


def test_missing_browser_skips_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("PATCHMOSAIC_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("PATCHMOSAIC_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make browser"), launch_chromium():
        pass
    monkeypatch.setenv("PATCHMOSAIC_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="make browser"), launch_chromium():
        pass
