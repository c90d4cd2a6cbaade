"""``patchmosaic report``: one self-contained HTML page from run directories.

:func:`build_report` reads run directories and writes ``index.html`` into the
output directory: no other file, no server, no network (every image is a
``data:`` URI, the explorer's arrays sit in ``<script type="application/json">``
blocks and the script is inline). Per run directory it shows, as far as the
files are there:

* the key settings of ``config.json`` (or, for an evaluation directory, of the
  ``config`` inside ``metrics.json``) and the full configuration;
* the samples: ``grid.png``, else a grid re-rendered from ``samples.npz``
  (evaluation directories: from each ``samples_<name>.npz``);
* the locality schedule k(t) (``patch_sizes[i-1]`` is used at t = i/steps);
* evaluation results (``metrics.json`` of ``patchmosaic evaluate``):
  ``scatter.png``, ``comparison.png``, the aggregates and the per-seed table;
* comparison results (``leaderboard.json`` of ``patchmosaic compare``): the
  leaderboard table (medians with intervals, pooled R^2, ELS wins), the protocol
  (both step counts), ``per_step.png`` and ``comparison.png``;
* ``explain.json`` of ``patchmosaic explain``: its scalars, the ``summary``
  (medians over seeds) and ``per_seed`` metrics as tables, the ``definitions``
  (also as header tooltips), ``n_eff_over_time`` as a sentence with collapsed
  step-by-sample tables; other nested values as key paths; and the
  ``explain_*.png`` figures (click one for full size);
* with ``provenance.npz`` (``patchmosaic sample --provenance``): the mosaic
  explorer, where hovering or clicking a pixel of a sample lists the training
  patches whose centres it averages, with thumbnails
  of those training images and the patch outlined.

Arrays for the explorer are packed compactly: the smallest integer type that
holds them, little-endian, zlib-compressed, base64 (the page inflates them with
the browser's ``DecompressionStream``); only the training images that some
pixel references are embedded.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import re
import tempfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from patchmosaic import __version__
from patchmosaic.explain import run_training_set
from patchmosaic.runs import (
    CONFIG_FILE,
    EXPLAIN_FIGURES,
    EXPLAIN_FILE,
    GRID_FILE,
    PROVENANCE_FILE,
    SAMPLES_FILE,
    check_run_dir,
    format_seeds,
    load_provenance,
    load_samples,
    sample_file,
    save_grid,
    to_uint8,
)

__all__ = ["COMPARISON_FIGURES", "EVALUATION_FIGURES", "LEADERBOARD_FILE", "METRICS_FILE", "REPORT_FILE",
           "build_report"]

REPORT_FILE = "index.html"
METRICS_FILE = "metrics.json"  # as patchmosaic.pretrained.METRICS_FILE (written by `patchmosaic evaluate`)
EVALUATION_FIGURES = ("scatter.png", "comparison.png")
LEADERBOARD_FILE = "leaderboard.json"  # written by `patchmosaic compare`
COMPARISON_FIGURES = ("per_step.png", "comparison.png")

SAMPLE_SIDE_PX = 192  # explorer: a sample canvas is about this many CSS pixels wide
THUMB_SIDE_PX = 112  # explorer: training-image thumbnails
MAX_GRID_SAMPLES = 64  # re-rendered grids show at most this many samples
_JS_TYPES = {"|u1": "uint8", "<i2": "int16", "<i4": "int32", "<f4": "float32", "<f8": "float64"}


# ------------------------------------------------------------------ entry point


def build_report(run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                 overwrite: bool = False) -> Path:
    """Write a self-contained ``index.html`` describing ``run_dirs`` into ``out_dir``.

    Every input is read and checked before anything is written. ``out_dir`` is
    created if needed; an existing non-empty directory is refused unless
    ``overwrite``, which replaces ``index.html`` only (nothing is deleted).

    Args:
        run_dirs: Run directories of ``patchmosaic sample`` (``config.json``),
            ``patchmosaic evaluate`` (``metrics.json``) or ``patchmosaic compare``
            (``leaderboard.json``), in report order.
        out_dir: Output directory for ``index.html``.
        overwrite: Allow a non-empty ``out_dir``.

    Returns:
        The path of the written ``index.html``.

    Raises:
        FileNotFoundError: A run directory, or its ``config.json``, is missing.
        FileExistsError: ``out_dir`` is a file, or non-empty without ``overwrite``.
        ValueError: No run directories, or a run's files are unreadable or
            inconsistent (e.g. its training set cannot be loaded for the explorer).
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("no run directories given; pass at least one RUN_DIR")
    out = check_run_dir(out_dir, overwrite=overwrite, files=(REPORT_FILE,))
    runs = [_Run.load(d) for d in dirs]
    sections = []
    for i, run in enumerate(runs):
        try:
            sections.append(_run_section(run, f"run-{i + 1}"))
        except (TypeError, KeyError, AttributeError, IndexError) as err:  # values of unexpected types or shapes
            raise ValueError(f"{run.path}: unexpected contents in its {CONFIG_FILE} or {METRICS_FILE} "
                             f"({type(err).__name__}: {err})") from err
    toc = "\n".join(
        f'<li><a href="#run-{i + 1}">{_e(run.title)}</a> <span class="muted">{_e(run.kind)}</span></li>'
        for i, run in enumerate(runs)
    )
    page = _render_template({
        "TITLE": _e("patchmosaic report: " + ", ".join(run.title for run in runs)),
        "GENERATED": _e(f"patchmosaic {__version__}, "
                        f"{_dt.datetime.now().astimezone().isoformat(timespec='seconds')}"),
        "TOC": toc,
        "BODY": "\n".join(sections),
    })
    out.mkdir(parents=True, exist_ok=True)
    return _write_atomic(out / REPORT_FILE, page)


def _write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    f = open(tmp, "x", encoding="utf-8")  # "x": never clobber an existing file; permissions follow the umask
    try:
        with f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _render_template(values: dict[str, str]) -> str:
    """Fill ``{{NAME}}`` slots of ``report_template.html`` in one pass (inserted text is not rescanned)."""
    template = resources.files("patchmosaic").joinpath("report_template.html").read_text(encoding="utf-8")
    return re.sub(r"\{\{([A-Z]+)\}\}", lambda m: values[m.group(1)], template)


# ------------------------------------------------------------------ run directories


@dataclass(frozen=True)
class _Run:
    """What one run directory holds."""

    path: Path
    config: dict[str, Any]  # config.json, or metrics.json["config"] of an evaluation directory
    metrics: dict[str, Any] | None  # metrics.json with per_seed and aggregates, or None
    comparison: dict[str, Any] | None = None  # leaderboard.json of `compare`, or None

    @property
    def title(self) -> str:
        return self.path.name or str(self.path)

    @property
    def kind(self) -> str:
        if self.comparison is not None:
            return "comparison"
        if self.metrics is not None:
            return "evaluation"
        return "network samples" if self.config.get("denoiser") == "network" else "sample run"

    @classmethod
    def load(cls, path: Path) -> _Run:
        if not path.exists():
            raise FileNotFoundError(f"run directory not found: {path}")
        if not path.is_dir():
            raise ValueError(f"{path} is not a directory; pass run directories (holding {CONFIG_FILE})")
        metrics = None
        if (path / METRICS_FILE).is_file():
            data = _read_json(path / METRICS_FILE)
            if isinstance(data, dict) and "per_seed" in data and "aggregates" in data:
                rows, agg = data["per_seed"], data["aggregates"]
                if not (isinstance(rows, list) and all(isinstance(r, dict) for r in rows) and isinstance(agg, dict)):
                    raise ValueError(f"{path / METRICS_FILE}: 'per_seed' must be a list of objects and 'aggregates' "
                                     "an object (not an evaluate metrics file?)")
                metrics = data
        comparison = None
        if (path / LEADERBOARD_FILE).is_file():
            data = _read_json(path / LEADERBOARD_FILE)
            if not (isinstance(data, dict) and isinstance(data.get("leaderboard"), list)
                    and all(isinstance(e, dict) for e in data["leaderboard"]) and isinstance(data.get("config"), dict)):
                raise ValueError(f"{path / LEADERBOARD_FILE}: expected 'leaderboard' (a list of objects) and 'config' "
                                 "(not a compare leaderboard?)")
            comparison = data
        if (path / CONFIG_FILE).is_file():
            config = _read_json(path / CONFIG_FILE)
        elif comparison is not None:
            config = comparison["config"]
        elif metrics is not None and isinstance(metrics.get("config"), dict):
            config = metrics["config"]
        else:
            raise FileNotFoundError(
                f"{path} has no {CONFIG_FILE} (nor an evaluation {METRICS_FILE}): not a patchmosaic run directory"
            )
        if not isinstance(config, dict):
            raise ValueError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
        return cls(path=path, config=config, metrics=metrics, comparison=comparison)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _lookup(config: dict[str, Any], *paths: str) -> Any:
    """The first of the dotted ``paths`` present in ``config`` (``None`` if none is)."""
    for path in paths:
        node: Any = config
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            return node
    return None


# Header rows: label -> where the value may sit (sample runs first, then evaluation configs).
_HEADER = (
    ("machine", ("machine",)),
    ("denoiser", ("denoiser",)),
    ("padding", ("padding", "training_set.padding")),
    ("dataset", ("dataset", "training_set.dataset")),
    ("n_train", ("n_train", "training_set.n_train")),
    ("size", ("size", "training_set.image_size")),
    ("image shape", ("image_shape",)),
    ("steps", ("steps",)),
    ("seeds", ("seeds",)),
    ("label", ("label",)),
    ("dtype", ("dtype",)),
    ("patch sizes", ("patch_sizes",)),
    ("schedule source", ("patch_sizes_source",)),
    ("model", ("model", "like")),
    ("wall time (s)", ("wall_time_s",)),
    ("s / sample", ("seconds_per_sample",)),
    ("timestamp", ("timestamp",)),
)


def _run_section(run: _Run, anchor: str) -> str:
    parts = [
        f'<section class="run" id="{anchor}">',
        f'<h2>{_e(run.title)} <span class="kind">{_e(run.kind)}</span></h2>',
        f'<p class="path"><code>{_e(str(run.path))}</code></p>',
        _header_html(run),
        _samples_html(run),
        _schedule_html(run),
    ]
    if run.metrics is not None:
        parts.append(_evaluation_html(run))
    if run.comparison is not None:
        parts.append(_comparison_html(run))
    parts.append(_explain_html(run))
    if (run.path / PROVENANCE_FILE).is_file():
        parts.append(_explorer_html(run, anchor))
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def _header_html(run: _Run) -> str:
    rows = []
    for label, paths in _HEADER:
        value = _lookup(run.config, *paths)
        if value is None and label not in ("machine", "padding", "dataset", "n_train", "steps", "seeds"):
            continue
        text = _format_seeds(value) if label == "seeds" and isinstance(value, list) else _fmt(value)
        rows.append((label, text))
    command = _lookup(run.config, "command") or (run.metrics or {}).get("command")
    full = json.dumps(run.config, indent=2, sort_keys=True)
    return "\n".join([
        '<div class="settings">',
        _kv_table(rows),
        f'<p class="command"><code>{_e(command)}</code></p>' if command else "",
        f"<details><summary>full configuration</summary><pre>{_e(full)}</pre></details>",
        "</div>",
    ])


# ------------------------------------------------------------------ samples and schedule


def _samples_html(run: _Run) -> str:
    grid, samples = run.path / GRID_FILE, run.path / SAMPLES_FILE
    if grid.is_file():
        return _figure("Samples", _data_uri(grid.read_bytes()), f"{GRID_FILE}")
    if samples.is_file():
        archive = load_samples(samples)
        return _figure("Samples", _data_uri(_grid_png(archive["images"])),
                       _grid_caption(SAMPLES_FILE, archive["seeds"]))
    archives = _sample_archives(run)
    archives.sort(key=lambda path: path.name != sample_file("network"))  # the reference first, then by name
    if not archives:
        return _note("Samples", f"no {GRID_FILE} or {SAMPLES_FILE} in this directory.")
    figures = []
    for path in archives:
        archive = load_samples(path)
        name = _display_name(path.stem.removeprefix("samples_"))
        figures.append(f'<figure><img class="grid" src="{_data_uri(_grid_png(archive["images"]))}" '
                       f'alt="{_e(name)} samples"><figcaption><b>{_e(name)}</b> '
                       f'{_e(_grid_caption(path.name, archive["seeds"]))}</figcaption></figure>')
    return '<section class="sub"><h3>Samples</h3><div class="figures">' + "".join(figures) + "</div></section>"


def _sample_archives(run: _Run) -> list[Path]:
    """The ``samples_<name>.npz`` of an evaluation or comparison, sorted by name.

    Those its ``config["files"]`` lists (only this run's, so a file an earlier run
    left in the directory is never shown as current); every ``samples_*.npz`` for
    runs that predate the list.
    """
    if run.metrics is None and run.comparison is None:
        return []
    config = (run.comparison or run.metrics or {}).get("config")
    listed = config.get("files") if isinstance(config, dict) else None
    if not isinstance(listed, dict):
        return sorted(run.path.glob(sample_file("*")))
    names = {f for k, f in listed.items() if k.startswith("samples_") and isinstance(f, str) and Path(f).name == f}
    return sorted(run.path / f for f in names if (run.path / f).is_file())


def _grid_png(images: np.ndarray) -> bytes:
    """``[B, C, H, W]`` images in [-1, 1] as a PNG grid (:func:`~patchmosaic.runs.save_grid`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / GRID_FILE
        save_grid(images[:MAX_GRID_SAMPLES], path, nrow=10 if len(images) > 8 else 8, scale=2)
        return path.read_bytes()


def _grid_caption(name: str, seeds: np.ndarray) -> str:
    shown = min(len(seeds), MAX_GRID_SAMPLES)
    more = f", first {shown} of {len(seeds)}" if shown < len(seeds) else ""
    return f"{name}: seeds {_format_seeds(seeds[:shown].tolist())}{more} (re-rendered)"


def _schedule_html(run: _Run) -> str:
    if run.comparison is not None:
        return ""  # each denoiser's schedule is among its parameters in the leaderboard
    sizes = run.config.get("patch_sizes")
    machine = run.config.get("machine")
    if sizes is None:
        what = "a network has no locality schedule" if machine is None else f"machine {machine!r} has no patches"
        return _note("Locality schedule", f"no patch sizes: {what}.")
    if not isinstance(sizes, list) or not sizes or not all(isinstance(k, int) and k > 0 for k in sizes):
        raise ValueError(f"{run.path}: patch_sizes must be a list of positive integers, got {sizes!r}")
    steps = run.config.get("steps", len(sizes))
    if steps != len(sizes):
        raise ValueError(f"{run.path}: {len(sizes)} patch sizes for steps = {steps}; they must match")
    shape = run.config.get("image_shape")
    side = max(shape[1:]) if isinstance(shape, list) and len(shape) == 3 else None
    caption = (f"k(t), lowest noise first: {','.join(map(str, sizes))}; entry i-1 is used at t = i/{steps}, "
               "sampling runs from t = 1 down.")
    return _figure("Locality schedule", _data_uri(_schedule_png(sizes, side)), caption, cls="plot")


def _schedule_png(sizes: Sequence[int], side: int | None) -> bytes:
    """Patch size k against t, ``sizes[i-1]`` at ``t = i/steps``, as a PNG (matplotlib Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = len(sizes)
    t = np.arange(1, steps + 1) / steps  # [steps]
    fig = Figure(figsize=(5.2, 2.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(t, sizes, where="mid", color="#888", lw=1)
    ax.plot(t, sizes, "o", color="#1f6feb", ms=4)
    if side is not None and max(sizes) >= side / 2:  # the patch nearly covers the image
        ax.axhline(side, color="#c33", ls="--", lw=1, label=f"image side ({side})")
        ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.set_xlim(0, 1.03)
    ax.set_yticks(sorted(set(sizes)))
    ax.set_xlabel("t (noise level; DDIM runs from t = 1 down)")
    ax.set_ylabel("patch size k")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ------------------------------------------------------------------ evaluation and explain


def _evaluation_html(run: _Run) -> str:
    metrics = run.metrics or {}
    parts = ['<section class="sub"><h3>Evaluation</h3>']
    figures = [f'<figure><img src="{_data_uri((run.path / name).read_bytes())}" alt="{_e(name)}">'
               f"<figcaption>{_e(name)}</figcaption></figure>"
               for name in EVALUATION_FIGURES if (run.path / name).is_file()]
    if figures:
        parts.append('<div class="figures">' + "".join(figures) + "</div>")
    frac = metrics.get("fraction_machine_beats_baseline")
    if isinstance(frac, dict) and {"machine", "baseline", "wins", "n"} <= set(frac):
        parts.append(f"<p>{_e(_display_name(frac['machine']))} beats {_e(_display_name(frac['baseline']))} on "
                     f"<b>{_fmt(frac['wins'])}/{_fmt(frac['n'])}</b> seeds ({_e(frac.get('metric', ''))}).</p>")
    parts.append("<h4>Aggregates</h4>")
    parts.append(_aggregates_table(metrics["aggregates"]))
    rows = metrics["per_seed"]
    parts.append(f"<h4>Per seed ({len(rows)})</h4>")
    parts.append(_records_table(rows) if _is_records(rows) else _kv_table(_flatten(rows, "per_seed")))
    parts.append("</section>")
    return "\n".join(parts)


def _comparison_html(run: _Run) -> str:
    data = run.comparison or {}
    cfg = data["config"]
    parts = ['<section class="sub"><h3>Comparison with the network</h3>',
             f"<p>Network sampled with <b>{_fmt(cfg.get('network_steps'))}</b> steps, denoisers with "
             f"<b>{_fmt(cfg.get('steps'))}</b> steps ({_e(cfg.get('sampler'))} sampler, {_e(cfg.get('grid'))} grid), "
             f"{_fmt(len(cfg.get('seeds') or []))} seeds, the same noise for everyone.</p>"]
    figures = [f'<figure><img src="{_data_uri((run.path / name).read_bytes())}" alt="{_e(name)}">'
               f"<figcaption>{_e(name)}</figcaption></figure>"
               for name in COMPARISON_FIGURES if (run.path / name).is_file()]
    if figures:
        parts.append('<div class="figures">' + "".join(figures) + "</div>")
    columns = ["#", "denoiser", "Pearson r", "r^2", "R^2", "R^2 (ADS, mean)", "R^2 pooled", "MSE", "ELS beats it",
               "s / seed", "parameters"]
    rows = []
    for rank, e in enumerate(data["leaderboard"], 1):
        m = e.get("metrics", {})
        win = e.get("els_beats_this")
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in (e.get("parameters") or {}).items()) or "-"
        rows.append([str(rank), str(e.get("name")), *(_interval(m.get(k, {})) for k in ("pearson_r", "r_squared", "R2")),
                     _fmt(e.get("R2_ads_mean")), _interval(e.get("R2_pooled", {}), "value"),
                     _interval(m.get("mse", {})), "-" if not win else f"{_fmt(win['wins'])}/{_fmt(win['n'])}",
                     _fmt(e.get("seconds_per_seed")), params])
    parts.append("<h4>Leaderboard</h4>")
    parts.append("<p>Medians over seeds with percentile-bootstrap 95% intervals, best Pearson r first.</p>")
    parts.append('<div class="scroll">' + _table(columns, rows) + "</div>")
    per_seed = data.get("per_seed")
    if _is_records(per_seed):
        parts.append(f"<details><summary>per seed ({len(per_seed)})</summary>{_records_table(per_seed)}</details>")
    parts.append("</section>")
    return "\n".join(parts)


def _interval(stats: Any, central: str = "median") -> str:
    if not isinstance(stats, dict) or stats.get(central) is None:
        return "n/a"
    return f"{_fmt(stats[central])} [{_fmt(stats.get('ci_low'))}, {_fmt(stats.get('ci_high'))}]"


def _is_records(value: Any) -> bool:
    """A non-empty list of dicts (one dict per seed, say): shown as a table."""
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _records_table(rows: Sequence[dict[str, Any]], hints: dict[str, str] | None = None) -> str:
    """A list of dicts as one scrollable table: a row per dict, a column per key (``seed``, ``label`` first)."""
    keys = list(dict.fromkeys(key for row in rows for key in row))
    columns = [k for k in ("seed", "label") if k in keys] + [k for k in keys if k not in ("seed", "label")]
    return ('<div class="scroll">'
            + _table(columns, [[_fmt(r.get(c)) for c in columns] for r in rows], hints=hints)
            + "</div>")


_STATS = ("median", "ci_low", "ci_high", "level", "n", "resamples", "seed")


def _aggregates_table(aggregates: Any) -> str:
    """``{name: {metric: {median, ci_low, ...}}}`` as one table; anything else as key paths."""
    nested = isinstance(aggregates, dict) and all(
        isinstance(metrics, dict) and all(isinstance(stats, dict) for stats in metrics.values())
        for metrics in aggregates.values()
    )
    if not nested:
        return _kv_table(_flatten(aggregates, "aggregates"))
    stats = [s for s in _STATS if any(s in st for m in aggregates.values() for st in m.values())]
    extra = sorted({k for m in aggregates.values() for st in m.values() for k in st} - set(stats))
    columns = ["", "metric", *stats, *extra]
    rows = [[name, metric, *(_fmt(st.get(c)) for c in [*stats, *extra])]
            for name, metrics in aggregates.items() for metric, st in metrics.items()]
    return _table(columns, rows)


def _explain_html(run: _Run) -> str:
    """``explain.json`` of ``patchmosaic explain`` (see :func:`patchmosaic.explain.explain_run`) and its figures.

    The known keys get their own layout: ``summary`` (medians over seeds) as a
    small table, ``definitions`` as a definition list (also the tooltips of the
    matching table headers), ``per_seed`` as a table with a row per seed,
    ``n_eff_over_time`` as a sentence and collapsed per-step tables (the figure
    ``explain_neff.png`` plots it); ``figures`` only names the embedded figures.
    Other top-level scalars form a table, other lists of dicts tables, anything
    else nested a table of key paths.
    """
    json_path = run.path / EXPLAIN_FILE
    figures = [name for name in EXPLAIN_FIGURES.values() if (run.path / name).is_file()]
    if not json_path.is_file() and not figures:
        return ""
    parts = ['<section class="sub"><h3>Explain</h3>']
    data = _read_json(json_path) if json_path.is_file() else None
    if data is not None and not isinstance(data, dict):
        parts.append(_kv_table(_flatten(data, EXPLAIN_FILE)))
    elif isinstance(data, dict):
        parts.append(_explain_json_html(data, figures))
    if figures:
        parts.append('<h4>Figures <span class="muted">(click one to see it at full size)</span></h4>'
                     '<div class="figures explain">' + "".join(
                         f'<figure><img class="zoomable" src="{_data_uri((run.path / name).read_bytes())}" '
                         f'alt="{_e(name)}" title="click to toggle full size"><figcaption>{_e(name)}</figcaption>'
                         "</figure>" for name in _explain_figure_order(figures)) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


def _explain_figure_order(figures: list[str]) -> list[str]:
    """The wide, short figures first (N_eff over time, displacement), then the tall mosaic map."""
    first = [EXPLAIN_FIGURES.get(key) for key in ("n_eff", "displacement")]
    return [f for f in first if f in figures] + [f for f in figures if f not in first]


def _explain_json_html(data: dict[str, Any], figures: Sequence[str]) -> str:
    parts = []
    definitions = data.get("definitions")
    defs_ok = isinstance(definitions, dict) and all(_is_scalar(v) for v in definitions.values())
    hints = {str(k): str(v) for k, v in definitions.items()} if defs_ok else {}
    per_seed = data.get("per_seed")
    summary = data.get("summary")
    scalars = [(k, _fmt(v)) for k, v in data.items() if _is_scalar(v)]
    if scalars:
        parts.append(f"<h4>{_e(EXPLAIN_FILE)}</h4>" + _kv_table(scalars))
    handled: set[str] = set()
    if isinstance(summary, dict) and summary and all(_is_scalar(v) for v in summary.values()):
        handled.add("summary")
        n = f" over {len(per_seed)} seeds" if isinstance(per_seed, list) else ""
        prefix = "median_" if all(str(k).startswith("median_") for k in summary) else ""
        rows = [(str(k).removeprefix(prefix), _fmt(v)) for k, v in summary.items()]
        column = f"median{n}" if prefix else "value"
        parts.append("<h4>Summary</h4>" + _table(["metric", column], rows, hints=hints, hint_column=0))
    if defs_ok and definitions:
        handled.add("definitions")
        parts.append("<h4>Definitions</h4><dl class=\"defs\">" + "".join(
            f"<dt>{_e(k)}</dt><dd>{_e(_fmt(v) if v is None else v)}</dd>" for k, v in definitions.items())
            + "</dl>")
    if _is_records(per_seed):
        handled.add("per_seed")
        parts.append(f"<h4>Per seed ({len(per_seed)})</h4>" + _records_table(per_seed, hints=hints))
    over_time = data.get("n_eff_over_time")
    if over_time is not None:
        handled.add("n_eff_over_time")
        seeds = [r.get("seed") for r in per_seed] if _is_records(per_seed) else None
        parts.append("<h4>N_eff over time</h4>" + _over_time_html(over_time, seeds, figures))
    named = data.get("figures")
    if isinstance(named, dict) and all(isinstance(v, str) for v in named.values()):
        handled.add("figures")  # the figures themselves are embedded below
        missing = [v for v in named.values() if v not in figures]
        if missing:
            parts.append(f'<p class="note">{_e(EXPLAIN_FILE)} names figures that are not in the run directory: '
                         f"{_e(', '.join(missing))}.</p>")
    nested = []
    for key, value in data.items():
        if _is_scalar(value) or key in handled:
            continue
        if _is_records(value):
            parts.append(f"<h4>{_e(key)} ({len(value)})</h4>" + _records_table(value, hints=hints))
        else:
            nested.extend(_flatten(value, key))
    if nested:
        parts.append(f"<h4>{_e(EXPLAIN_FILE)}: nested values</h4>" + _kv_table(nested))
    return "\n".join(parts)


def _over_time_html(value: Any, seeds: Sequence[Any] | None, figures: Sequence[str]) -> str:
    """``n_eff_over_time`` (``t``, ``patch_size``, ``median_<stat>`` as ``[seed][step]``): a sentence and
    collapsed step-by-seed tables, never a dump of every number as a key path."""
    plot = EXPLAIN_FIGURES.get("n_eff")
    where = f"; plotted in {plot}" if plot in figures else ""
    key_t = "sigma" if isinstance(value, dict) and "sigma" in value else "t"  # "t": explain.json of older runs
    t = value.get(key_t) if isinstance(value, dict) else None
    if not (isinstance(t, list) and t and all(isinstance(v, (int, float)) for v in t)):
        what = (f"keys {', '.join(map(str, value))}" if isinstance(value, dict)
                else f"a {type(value).__name__}")
        return f'<p class="note">Not shown as a table ({_e(what)}){_e(where)}.</p>'
    steps = len(t)
    sizes = value.get("patch_size")
    sizes = sizes if isinstance(sizes, list) and len(sizes) == steps else None
    series = {
        key: rows for key, rows in value.items()
        if key not in (key_t, "patch_size") and isinstance(rows, list) and rows
        and all(isinstance(r, list) and len(r) == steps for r in rows)
    }
    n = len(next(iter(series.values()))) if series else 0
    series = {key: rows for key, rows in series.items() if len(rows) == n}  # one row per sample in each
    names = ([f"seed {s}" for s in seeds] if seeds is not None and len(seeds) == n
             else [f"sample {b + 1}" for b in range(n)])
    text = (f"Medians over pixels at each of the {steps} sampling steps ({key_t} = {t[0]:.3g} to {t[-1]:.3g}"
            + (f", k = {sizes[0]} to {sizes[-1]}" if sizes else "") + f") for {n} samples{where}.")
    parts = [f'<p class="note">{_e(text)}</p>']
    for key, rows in series.items():
        columns = [key_t, *(["k"] if sizes else []), *names]
        body = [[f"{t[i]:.3g}", *([_fmt(sizes[i])] if sizes else []), *(_sig(r[i]) for r in rows)]
                for i in range(steps)]
        parts.append(f"<details><summary>{_e(key)} per step and sample</summary>"
                     f'<div class="scroll">{_table(columns, body)}</div></details>')
    other = {k: v for k, v in value.items() if k not in (key_t, "patch_size") and k not in series}
    if other:
        parts.append(_kv_table(_flatten(other, "n_eff_over_time")))
    return "".join(parts)


# ------------------------------------------------------------------ the mosaic explorer


def _load_training_images(run: _Run) -> tuple[np.ndarray, np.ndarray | None, list[str] | None]:
    """The run's training set as uint8 ``[N, H, W, C]``, labels and class names."""
    data = run_training_set(run.config, run.path)
    C = data.images.shape[1]
    if C not in (1, 3):
        raise ValueError(f"{run.path}: the explorer shows 1 (grey) or 3 (RGB) channels, got C = {C}")
    pixels = to_uint8(data.images.numpy()).transpose(0, 2, 3, 1)  # [N, H, W, C]
    labels = None if data.labels is None else data.labels.numpy()
    return pixels, labels, None if data.classes is None else list(data.classes)


def _explorer_html(run: _Run, anchor: str) -> str:
    samples_path = run.path / SAMPLES_FILE
    if not samples_path.is_file():
        raise ValueError(f"{run.path}: {PROVENANCE_FILE} needs the samples it describes, but {SAMPLES_FILE} is missing")
    archive = load_samples(samples_path)
    train, train_labels, classes = _load_training_images(run)
    prov = load_provenance(run.path / PROVENANCE_FILE, n_train=len(train))
    B, H, W, m = prov["index"].shape
    if train.shape[1:3] != (H, W) or archive["images"].shape[2:] != (H, W):
        raise ValueError(f"{run.path}: {PROVENANCE_FILE} is for {H}x{W} images but the samples are "
                         f"{list(archive['images'].shape[2:])} and the training images {list(train.shape[1:3])}")
    row_of = {int(s): i for i, s in enumerate(archive["seeds"].tolist())}
    absent = [int(s) for s in prov["seeds"] if int(s) not in row_of]
    if absent:
        raise ValueError(f"{run.path}: {PROVENANCE_FILE} has seeds {absent} that {SAMPLES_FILE} does not")
    rows = [row_of[int(s)] for s in prov["seeds"]]
    samples = to_uint8(archive["images"][rows]).transpose(0, 2, 3, 1)  # [B, H, W, C]
    if samples.shape[-1] != train.shape[-1]:
        raise ValueError(f"{run.path}: samples have {samples.shape[-1]} channels, training images {train.shape[-1]}")
    ids = np.unique(prov["index"][prov["index"] >= 0])  # [R] referenced training images
    labels = archive.get("labels")
    k = int(prov["patch_size"])
    meta = {
        "H": H, "W": W, "C": int(samples.shape[-1]), "m": m, "patch_size": k,
        "padding": run.config.get("padding"),
        "sigma_final": float(prov["sigma"][-1]), "k_final": int(prov["step_patch_sizes"][-1]),
        "seeds": [int(s) for s in prov["seeds"]],
        "labels": None if labels is None else [int(labels[r]) for r in rows],
        "classes": classes,
        "scale": max(1, round(SAMPLE_SIDE_PX / max(H, W))),
        "thumb_scale": max(1, round(THUMB_SIDE_PX / max(H, W))),
        "train_ids": ids.tolist(),
        "train_labels": None if train_labels is None else train_labels[ids].tolist(),
        "samples": _pack(samples),
        "index": _pack(prov["index"]),
        "source": _pack(prov["source"]),
        "weight": _pack(prov["weight"].astype("<f4")),
        "count": _pack(prov["count"]),
        "n_eff": _pack(prov["n_eff"][-1].astype("<f4")),  # [B, H, W] final step
        "entropy": _pack(prov["entropy"][-1].astype("<f4")),  # [B, H, W] final step
        "train": _pack(train[ids]),  # [R, H, W, C]
    }
    data_id = f"{anchor}-provenance"
    scale = meta["scale"]
    captions = [f"seed {seed}" if labels is None else f"seed {seed}, class {label}"
                for seed, label in zip(meta["seeds"], meta["labels"] or [None] * B, strict=True)]
    figures = "".join(
        f'<figure><canvas class="sample" data-b="{b}" width="{W * scale}" height="{H * scale}" tabindex="0" '
        f'aria-label="sample {b + 1}, {caption}"></canvas><figcaption>{caption}</figcaption></figure>'
        for b, caption in enumerate(captions)
    )
    patch = f"k = {k}" if k > 0 else "no patches (k = 0)"
    return "\n".join([
        '<section class="sub"><h3>Mosaic explorer</h3>',
        f'<p class="note">Each pixel of a sample is a softmax-weighted average of training-patch centres. Hover over '
        f"a pixel to list its top {m} source patches at the final step (sigma = {meta['sigma_final']:.3g}, {patch}); click "
        "to pin it (click again or Esc to unpin, arrow keys move the pin). Thumbnails outline the k x k source "
        f"patch and mark its centre. {len(ids)} of {len(train)} training images are referenced.</p>",
        f'<div class="explorer" data-source="{data_id}">',
        '<div class="explorer-main"><div class="toolbar"><label>show <select class="view">'
        '<option value="sample">samples</option><option value="n_eff">N_eff (final step, log scale)</option>'
        '<option value="entropy">entropy (final step)</option></select></label> <span class="legend"></span></div>',
        f'<div class="samples">{figures}</div></div>',
        '<aside class="panel" aria-live="polite"><p class="hint">Loading the explorer&hellip;</p></aside>',
        "</div>",
        f'<script type="application/json" id="{data_id}">{_json_for_script(meta)}</script>',
        "</section>",
    ])


def _pack(arr: np.ndarray) -> dict[str, Any]:
    """An array as ``{dtype, shape, data}``: narrowest type, little-endian, zlib, base64."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "iu" and arr.dtype != np.uint8:
        lo, hi = int(arr.min(initial=0)), int(arr.max(initial=0))
        for dtype in ("<i2", "<i4"):
            if np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max:
                break
        else:
            dtype = "<f8"  # exact for |values| < 2^53
        arr = arr.astype(dtype)
    data = np.ascontiguousarray(arr)
    return {
        "dtype": _JS_TYPES[data.dtype.str],
        "shape": list(data.shape),
        "data": base64.b64encode(zlib.compress(data.tobytes(), 9)).decode("ascii"),
    }


def _json_for_script(obj: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


# ------------------------------------------------------------------ HTML helpers


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(title: str, src: str, caption: str, *, cls: str = "grid") -> str:
    return (f'<section class="sub"><h3>{_e(title)}</h3><figure><img class="{cls}" src="{src}" alt="{_e(title)}">'
            f"<figcaption>{_e(caption)}</figcaption></figure></section>")


def _note(title: str, text: str) -> str:
    return f'<section class="sub"><h3>{_e(title)}</h3><p class="note">{_e(text)}</p></section>'


def _table(columns: Sequence[str], rows: Iterable[Sequence[str]], *, hints: dict[str, str] | None = None,
           hint_column: int | None = None) -> str:
    """A table; ``hints`` give ``title`` tooltips to the headers named in it, or with ``hint_column`` to
    the cells of that column whose text is named in it."""
    hints = hints or {}

    def cell(tag: str, text: str, hinted: bool) -> str:
        hint = _hint(hints, text) if hinted else None
        if hint is None:
            return f"<{tag}>{_e(text)}</{tag}>"
        return f'<{tag} class="hinted" title="{_e(hint)}">{_e(text)}</{tag}>'

    head = "".join(cell("th", c, hint_column is None) for c in columns)
    body = "".join("<tr>" + "".join(cell("td", v, j == hint_column) for j, v in enumerate(row)) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _hint(hints: dict[str, str], name: str) -> str | None:
    """The hint for ``name``: its own, else that of the longest hinted name inside it
    (``displacement`` for ``mean_displacement_px``)."""
    if name in hints:
        return hints[name]
    inside = [key for key in hints if key and key in name]
    return hints[max(inside, key=len)] if inside else None


def _kv_table(rows: Iterable[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _display_name(name: Any) -> str:
    """The paper's names of the machines (``ideal`` is IS); other names as given."""
    return {"ideal": "IS", "es": "ES", "ls": "LS", "els": "ELS"}.get(str(name), str(name))


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _flatten(value: Any, prefix: str) -> list[tuple[str, str]]:
    """Nested dicts as ``(dotted.key.path, formatted leaf)`` rows; lists are leaves."""
    if isinstance(value, dict):
        if not value:
            return [(prefix, "{}")]
        return [row for k, v in value.items() for row in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    return [(prefix, _fmt(value))]


def _fmt(value: Any) -> str:
    """A short human-readable rendering of a JSON value."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == int(value) and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, list):
        if all(_is_scalar(v) for v in value):
            shown = ", ".join(_fmt(v) for v in value[:32])
            return f"[{shown}]" if len(value) <= 32 else f"[{shown}, …] ({len(value)} values)"
        return f"[list of {len(value)} items]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _sig(value: Any) -> str:
    """A number to 4 significant digits, from 1000 on as a rounded integer with separators (one style per
    column: 17,941 / 770.1 / 9.812, not 1.794e+04 beside 8447.7070); anything else as :func:`_fmt`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return _fmt(value)
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _format_seeds(seeds: Sequence[int]) -> str:
    """:func:`~patchmosaic.runs.format_seeds` of integer seeds (``"0-3, 5 (5)"``); anything else as :func:`_fmt`."""
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds):
        return _fmt(list(seeds))
    return format_seeds(seeds)
