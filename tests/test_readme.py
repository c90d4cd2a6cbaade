"""Every ```python block of README.md runs, in order, in one namespace (as a reader would paste them)."""

import re
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of each fenced ```python block."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_blocks_are_found():
    blocks = python_blocks("text\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = x\n```\n")
    assert blocks == [(3, "x = 1\n"), (9, "y = x\n")]


def test_readme_python_blocks_run():
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python blocks"
    namespace: dict = {"__name__": "__readme__"}
    for line, source in blocks:
        start = time.perf_counter()
        try:
            exec(compile(source, f"README.md, block at line {line}", "exec"), namespace)
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"README.md python block at line {line} raised {type(err).__name__}: {err}")
        assert time.perf_counter() - start < 60, f"README.md block at line {line} is too slow for a snippet"
