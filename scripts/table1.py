"""The paper's Table 1 (Kamb & Ganguli 2412.20292) from the outputs of ``scripts/reproduce_table1.sh``.

    python scripts/table1.py runs/table1 --out runs/table1/table1.md

For each model NAME, reads (and never recomputes anything but the formatting):

* ``RUN_DIR/evaluate-150-NAME/metrics.json``: ``patchmosaic evaluate`` in the
  paper's protocol (network 150 DDIM steps, machines one step per schedule entry);
* ``RUN_DIR/evaluate-20-NAME/metrics.json``: the same ELS samples against the
  network on the machines' 20-step grid ("20/20");
* the calibrated schedule ``PRETRAINED/NAME/schedule.json`` (a committed model)
  or else ``RUN_DIR/calibrate-NAME/schedule.json``, as the reproduce script picks it;
* ``RUN_DIR/compare-NAME/leaderboard.json``: ``patchmosaic compare`` of every
  denoiser against the network in the paper's protocol (ELS reused from the
  evaluation's samples), for the second table: each denoiser's median r and
  on how many seeds ELS beats it.

Writes one markdown row per model that has at least one of the two metrics
files, in Table 1's order (then any other ``evaluate-*-NAME`` found, sorted);
below the table the step counts read from the files, the models without any
file and every missing or inconsistent file. Medians and 95% intervals are the
bootstrap aggregates ``evaluate`` stored (Pearson r of the final images, which
the paper's code reports as r^2; R^2 = 1 - SS_res / SS_tot per image).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from patchmosaic.comparison import format_interval
from patchmosaic.runs import format_seeds

# The models of Table 1, in its order (scripts/reproduce_table1.sh trains and evaluates the same list).
TABLE1_MODELS = (
    "mnist-resnet-zeros",
    "fashion-resnet-zeros-cond",
    "mnist-resnet-circular",
    "mnist-unet-zeros",
    "fashion-unet-zeros-cond",
    "mnist-unet-attention",
)
PROTOCOLS = {"150": "paper protocol", "20": "20/20"}  # evaluate-<network steps>-NAME
METRICS_FILE = "metrics.json"
SCHEDULE_FILE = "schedule.json"
DEFAULT_PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
MISSING = "–"
HEADER = (
    "model",
    "calibrated k(sigma), lowest noise first",
    "seeds (n)",
    "ELS median r [95% CI], paper protocol",
    "ELS median r [95% CI], 20/20",
    "IS median r [95% CI], paper protocol",
    "ELS R^2 [95% CI], paper protocol",
    "ELS beats IS, paper protocol",
)
_EVAL_DIR = re.compile(r"^evaluate-(150|20)-(.+)$")
LEADERBOARD_FILE = "leaderboard.json"
# Column order of the denoiser table (others a leaderboard holds follow, sorted).
DENOISER_ORDER = ("els", "ls", "ideal", "wiener", "data-locality", "pspc", "nearest")
DENOISER_LABELS = {"els": "ELS", "ls": "LS", "ideal": "IS", "wiener": "Wiener", "data-locality": "data-locality",
                   "pspc": "PSPC", "nearest": "nearest training image"}


class Table1Error(ValueError):
    """A metrics or schedule file that cannot be read as what the table needs."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise Table1Error(f"cannot read {path}: {err}") from err
    if not isinstance(data, dict):
        raise Table1Error(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


def _get(data: dict[str, Any], path: Path, *keys: str) -> Any:
    """``data[k0][k1]...``, or a Table1Error naming the file and the missing key path."""
    value: Any = data
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise Table1Error(f"{path} has no {'.'.join(keys[: i + 1])}")
        value = value[key]
    return value


def read_evaluation(path: Path, network_steps: int) -> dict[str, Any]:
    """The numbers of one ``evaluate`` metrics.json that the table shows.

    Raises:
        Table1Error: If a needed entry is missing, the run compares something
            other than ELS with IS, or its network step count is not ``network_steps``.
    """
    data = _read_json(path)
    machine, baseline = _get(data, path, "config", "machine"), _get(data, path, "config", "baseline")
    if (machine, baseline) != ("els", "ideal"):
        raise Table1Error(f"{path} compares {machine!r} with {baseline!r}; Table 1 needs ELS ('els') vs IS ('ideal')")
    steps = _get(data, path, "config", "network_steps")
    if steps != network_steps:
        raise Table1Error(f"{path} ran the network with {steps} steps, but its directory says {network_steps}")
    beats = _get(data, path, "fraction_machine_beats_baseline")
    return {
        "els_r": _get(data, path, "aggregates", "els", "pearson_r"),
        "is_r": _get(data, path, "aggregates", "ideal", "pearson_r"),
        "els_R2": _get(data, path, "aggregates", "els", "R2"),
        "wins": int(_get(beats, path, "wins")),
        "n": int(_get(data, path, "n_seeds")),
        "seeds": [int(s) for s in _get(data, path, "config", "seeds")],
        "network_steps": int(steps),
        "machine_steps": int(_get(data, path, "config", "steps")),
        # the schedule as calibrated (evaluate records its sizes apart from the sizes on the machines' grid)
        "patch_sizes": [int(k) for k in ((data["config"].get("schedule") or {}).get("sizes")
                                         or _get(data, path, "config", "patch_sizes"))],
        "els_samples": (data["config"].get("reuse") or {}).get("els"),  # --reuse DIR of the ELS samples, if any
    }


def read_leaderboard(path: Path) -> dict[str, Any]:
    """The numbers of one ``compare`` leaderboard.json that the denoiser table shows.

    Raises:
        Table1Error: If a needed entry is missing or ELS is not among its denoisers.
    """
    data = _read_json(path)
    entries = _get(data, path, "leaderboard")
    if not isinstance(entries, list):
        raise Table1Error(f"{path} has a leaderboard that is not a list")
    denoisers: dict[str, dict[str, Any]] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise Table1Error(f"{path} has leaderboard entry {i} without a name")
        beats = entry.get("els_beats_this")
        denoisers[entry["name"]] = {
            "r": _get(entry, path, "metrics", "pearson_r"),
            "wins": None if beats is None else (int(beats["wins"]), int(beats["n"])),
            "parameters": entry.get("parameters") or {},
        }
    if "els" not in denoisers:
        raise Table1Error(f"{path} has no 'els' entry; the denoiser table compares every denoiser with ELS")
    return {
        "denoisers": denoisers,
        "seeds": [int(s) for s in _get(data, path, "config", "seeds")],
        "network_steps": int(_get(data, path, "config", "network_steps")),
        "steps": int(_get(data, path, "config", "steps")),
        "els_samples": (data["config"].get("reuse") or {}).get("els"),
    }


def _knob(name: str, entry: dict[str, Any] | None) -> str | None:
    """Where a denoiser's locality knob came from, as its leaderboard entry records it (None: no knob)."""
    if entry is None:
        return None
    params = entry["parameters"]
    label = DENOISER_LABELS.get(name, name)
    if name in ("ls", "els"):
        return f"{label} k(sigma) from {params.get('patch_sizes_source', '?')}"
    for key in ("threshold", "std", "patch_size"):
        if key in params:
            value = params[key]
            source = params.get(f"{key}_source") or (value.get("source") if isinstance(value, dict) else None)
            return f"{label} {key}(sigma) from {source}" if source else f"{label} {key} {value}"
    return None


def build_denoiser_table(run_dir: Path, names: list[str], evals_150: dict[str, dict[str, Any] | None]) -> list[str]:
    """The second table's lines: every denoiser's median r per model, from ``compare-NAME`` (empty if none)."""
    boards = {}
    for name in names:
        path = run_dir / f"compare-{name}" / LEADERBOARD_FILE
        if path.is_file():
            boards[name] = read_leaderboard(path)
    if not boards:
        return []
    found = {d for b in boards.values() for d in b["denoisers"]}
    order = [d for d in DENOISER_ORDER if d in found] + sorted(found - set(DENOISER_ORDER))
    header = ["model", "seeds (n)", *(f"{DENOISER_LABELS.get(d, d)} median r [95% CI]" for d in order)]
    lines = ["Every denoiser against each network (`compare-NAME`, paper protocol; "
             "after each r: seeds where ELS's r is strictly greater):", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes, protocols = [], set()
    for name, board in boards.items():
        protocols.add((board["network_steps"], board["steps"]))
        row = [f"`{name}`", format_seeds(board["seeds"])]
        for d in order:
            entry = board["denoisers"].get(d)
            if entry is None:
                row.append(MISSING)
                continue
            cell = format_interval(entry["r"])
            if entry["wins"] is not None:
                cell += f" ({entry['wins'][0]}/{entry['wins'][1]})"
            row.append(cell)
        lines.append("| " + " | ".join(row) + " |")
        paper = evals_150.get(name)
        if paper is not None and paper["els_samples"] != board["els_samples"]:
            notes.append(f"`{name}`: compare-{name} took its ELS samples from "
                         f"{board['els_samples'] or 'its own run'}, evaluate-150-{name} from "
                         f"{paper['els_samples'] or 'its own run'}")
    lines.append("")
    steps = "; ".join(f"network {n} DDIM steps, denoisers {m} steps" for n, m in sorted(protocols))
    lines.append(f"- {steps}.")
    for name, board in boards.items():
        knobs = [k for d in order if (k := _knob(d, board["denoisers"].get(d)))]
        if knobs:
            lines.append(f"- `{name}` knobs: " + "; ".join(knobs) + ".")
    missing = [n for n in names if n not in boards and evals_150.get(n) is not None]
    if missing:
        lines.append("- No compare-NAME/leaderboard.json: " + ", ".join(f"`{n}`" for n in missing) + ".")
    lines += [f"- {note}" for note in notes]
    return lines


def find_schedule(run_dir: Path, pretrained: Path, name: str) -> Path | None:
    """The schedule the reproduce script used: the committed one, else RUN_DIR's calibration."""
    for path in (pretrained / name / SCHEDULE_FILE, run_dir / f"calibrate-{name}" / SCHEDULE_FILE):
        if path.is_file():
            return path
    return None


def model_names(run_dir: Path, models: tuple[str, ...]) -> list[str]:
    """``models`` in order, then every other NAME of an ``evaluate-{150,20}-NAME`` directory, sorted."""
    found = {m.group(2) for p in run_dir.iterdir() if p.is_dir() and (m := _EVAL_DIR.match(p.name))}
    return [*models, *sorted(found - set(models))]


def build_table(
    run_dir: Path, *, pretrained: Path = DEFAULT_PRETRAINED, models: tuple[str, ...] = TABLE1_MODELS
) -> str:
    """The markdown table and its notes (see the module docstring).

    Raises:
        Table1Error: If ``run_dir`` is not a directory or a metrics/schedule file is unreadable.
    """
    if not run_dir.is_dir():
        raise Table1Error(f"{run_dir} is not a directory")
    rows: list[list[str]] = []
    absent: list[str] = []
    notes: list[str] = []
    protocols: dict[str, set[tuple[int, int]]] = {key: set() for key in PROTOCOLS}
    names = model_names(run_dir, models)
    evals_150: dict[str, dict[str, Any] | None] = {}
    for name in names:
        evals: dict[str, dict[str, Any] | None] = {}
        for key in PROTOCOLS:
            path = run_dir / f"evaluate-{key}-{name}" / METRICS_FILE
            evals[key] = read_evaluation(path, int(key)) if path.is_file() else None
        evals_150[name] = evals["150"]
        if not any(evals.values()):
            absent.append(name)
            continue
        for key, ev in evals.items():
            if ev is None:
                notes.append(f"`{name}`: no evaluate-{key}-{name}/{METRICS_FILE} ({PROTOCOLS[key]} cells: {MISSING})")
            else:
                protocols[key].add((ev["network_steps"], ev["machine_steps"]))

        schedule_path = find_schedule(run_dir, pretrained, name)
        if schedule_path is None:
            # no schedule file (e.g. an ablation given its k(sigma)): the sizes evaluate recorded as calibrated
            key, ev = next((key, ev) for key, ev in evals.items() if ev is not None)
            schedule = ",".join(map(str, ev["patch_sizes"]))
            notes.append(f"`{name}`: no {SCHEDULE_FILE} in {pretrained / name} or {run_dir / f'calibrate-{name}'}; "
                         f"k(sigma) as evaluate-{key}-{name} recorded it")
        else:
            sizes = [int(k) for k in _get(_read_json(schedule_path), schedule_path, "patch_sizes")]
            schedule = ",".join(map(str, sizes))
            for key, ev in evals.items():
                if ev is not None and ev["patch_sizes"] != sizes:
                    notes.append(f"`{name}`: evaluate-{key}-{name} used k = {','.join(map(str, ev['patch_sizes']))}, "
                                 f"not the schedule in {schedule_path}")

        paper, same_grid = evals["150"], evals["20"]
        seeds = format_seeds((paper or same_grid)["seeds"])
        if paper is not None and same_grid is not None and paper["seeds"] != same_grid["seeds"]:
            seeds = f"{format_seeds(paper['seeds'])} / {format_seeds(same_grid['seeds'])}"
            notes.append(f"`{name}`: the two evaluations used different seeds (paper protocol / 20/20)")
        if paper is not None and same_grid is not None and paper["els_samples"] != same_grid["els_samples"]:
            notes.append(f"`{name}`: the two evaluations took their ELS samples from different runs "
                         f"({paper['els_samples'] or 'computed'} / {same_grid['els_samples'] or 'computed'})")
        rows.append([
            f"`{name}`",
            schedule,
            seeds,
            format_interval(paper["els_r"]) if paper else MISSING,
            format_interval(same_grid["els_r"]) if same_grid else MISSING,
            format_interval(paper["is_r"]) if paper else MISSING,
            format_interval(paper["els_R2"]) if paper else MISSING,
            f"{paper['wins']}/{paper['n']}" if paper else MISSING,
        ])

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    for key, label in PROTOCOLS.items():
        if protocols[key]:
            steps = "; ".join(f"network {n} DDIM steps, machines {m} steps" for n, m in sorted(protocols[key]))
            lines.append(f"- {label} (`evaluate-{key}-NAME`): {steps}.")
    lines.append("- r: Pearson correlation of the final images with the network's (the paper's code calls it r^2); "
                 "R^2 = 1 - SS_res / SS_tot per image; medians over seeds with bootstrap 95% intervals; "
                 "ELS beats IS: seeds where ELS's r is strictly greater than IS's.")
    if absent:
        lines.append(f"- Missing (no evaluate-150 or evaluate-20 metrics in {run_dir}): "
                     + ", ".join(f"`{n}`" for n in absent) + ".")
    lines += [f"- {note}" for note in notes]
    denoiser_table = build_denoiser_table(run_dir, names, evals_150)
    if denoiser_table:
        lines += ["", *denoiser_table]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="OUT of scripts/reproduce_table1.sh (e.g. runs/table1)")
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write")
    parser.add_argument("--pretrained", type=Path, default=DEFAULT_PRETRAINED,
                        help="folder of the committed models' schedule.json (default: this checkout's pretrained/)")
    parser.add_argument("--models", default=",".join(TABLE1_MODELS),
                        help="comma-separated model names, in row order (default: Table 1's six); other "
                        "evaluate-*-NAME directories in RUN_DIR are appended")
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    try:
        table = build_table(args.run_dir, pretrained=args.pretrained, models=models)
    except Table1Error as err:
        print(f"table1.py: error: {err}", file=sys.stderr)
        return 1
    args.out.write_text(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
