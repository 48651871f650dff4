"""scRNA-seq denoising on Tabula Muris over split seeds: the controls, MAGIC, and the loop's
best versions, each scored once on the held-out half, in one table (mean ± sd over seeds).

    python bench/denoise.py                               # the fixed rows not stored yet
    python bench/denoise.py --launch harness              # run that row's loop per seed, score it
    python bench/denoise.py --row harness:0=runs/R        # a loop row's seed-0 run, scored
    python bench/denoise.py --redo magic                  # score a stored row again

Every figure comes from the task's own runtime and evaluator (`DenoiseTask.score`: the program
in an isolated worker, the held-out half never in it, our validity rule). Rows:
- `no_denoising`, `perfect`: the controls (the input half; the held-out counts);
- `magic`: MAGIC as OpenProblems runs it (the template's defaults: generation 0);
- `magic_ttt`: TTT-Discover's start (square root of the raw counts, then library-size
  normalisation, MAGIC knn 5 t 3, squared; no mass restored);
- `knobs`: a hand-picked setting of the template's knobs, to show what the building blocks
  reach (picked by looking at val only; not the loop's);
- `harness`, `weights`, `both`: the best version (selected on val) of a loop run with that
  lever set, one run per split seed (`--set seed=S`), its program scored on that seed's test.
The other datasets' scores of each program go beside the headline (transfer; never selected on).

Resumable: each (row, seed) is stored in bench/results/denoise.json as it finishes; a rerun
scores only what is missing (or what --redo names).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from sialoop.evaluator import best_version
from sialoop.harness.operators import apply_assignments
from sialoop.store import Store
from sialoop.tasks.denoise.task import DenoiseTask
from sialoop.tasks.templates import template_source

RESULTS = Path(__file__).parent / "results" / "denoise.json"
COLUMNS = ("mse", "poisson", "mse_norm", "poisson_norm", "valid", "mass_ratio", "seconds")

MAGIC_TTT = '''"""TTT-Discover's starting point: sqrt of raw counts, library-size normalised, MAGIC, squared."""
import graphtools
import numpy as np
import scipy.sparse as sp


def denoise(counts):
    x = np.sqrt(counts)
    x = x / np.maximum(x.sum(axis=1, keepdims=True), 1e-12)
    graph = graphtools.Graph(x, n_pca=100, knn=5, knn_max=15, decay=1, thresh=1e-4,
                             random_state=0, verbose=0)
    op = sp.csr_matrix(graph.diff_op)
    for _ in range(3):
        x = op @ x
    return np.square(np.asarray(x))
'''
KNOBS = {"NORM": "log", "T": 2, "POST": "explog", "SINK": 1, "MASS": "libsize"}
GENERATOR = files("sialoop.tasks.denoise") / "templates" / "generator.py"
LOOP_ROWS = {
    "harness": ["--set", "loop.levers=['harness']"],
    "weights": ["--set", "loop.levers=['weights']", "--set", f"harness='{GENERATOR}'"],
    "both": ["--set", f"harness='{GENERATOR}'"],
}


def template_with(knobs: dict[str, Any]) -> str:
    return apply_assignments(template_source("sialoop.tasks.denoise", "pipeline.py"), knobs)


def program_of_run(root: Path, task: DenoiseTask) -> tuple[str, str]:
    """The program the run's best version answers (for a generator harness, its proposal with
    the best val score) and where it came from."""
    store = Store.open(root)
    best = best_version(store)
    source = task.adapt_harness(store.path(best.harness_path).read_text())
    trajectories = store.trajectories(best.version_id, "val")
    scored = [t for t in trajectories if t.score is not None and isinstance(t.output, dict)]
    if scored and "def denoise" not in source:
        top = max(scored, key=lambda t: t.score.value if t.score else -math.inf)
        return top.output["program"], f"{root}: {best.version_id}, proposal {top.trajectory_id}"
    return source, f"{root}: {best.version_id}"


def control_figures(task: DenoiseTask, which: str) -> dict[str, dict[str, Any]]:
    """The no-denoising or perfect control on every test instance, scored in this process (a
    control is the evaluator's, not a program)."""
    out = {}
    for inst in task.instances("test"):
        figures = task.control(inst, which)
        out[inst.inputs["dataset"]] = {k: figures.get(k) for k in COLUMNS} | {"seconds": 0.0}
    return out


def program_figures(task: DenoiseTask, source: str) -> dict[str, dict[str, Any]]:
    out = {}
    for inst in task.instances("test"):
        try:
            d = task.score(inst, {"program": source}).detail
            out[inst.inputs["dataset"]] = {k: d.get(k) for k in COLUMNS} | {
                "shortcuts": d.get("shortcuts"), "upstream_valid": d.get("upstream_valid"),
                "poisson_norm_raw": d.get("poisson_norm_raw"),
            }  # fmt: skip
        except Exception as err:  # an invalid or failing program is a result, with why
            measured = getattr(err, "figures", {})
            out[inst.inputs["dataset"]] = {"valid": False, "error": str(err)[:400]} | {
                f"invalid_{k}": measured.get(k) for k in ("mse_norm", "poisson_norm")
            }
    return out


def launch(name: str, seed: int, data: Path, sets: list[str]) -> str:
    run_id = time.strftime("%Y%m%d-%H%M%S-bench-denoise-") + f"{name}-s{seed}"
    extra = [a for s in sets for a in ("--set", s)]
    cmd = [sys.executable, "-m", "sialoop.cli", "run", "--task", "denoise", "--data", str(data)]
    cmd += ["--run-id", run_id, "--set", f"seed={seed}", *LOOP_ROWS[name], *extra]
    subprocess.run(cmd, check=True)
    return f"runs/{run_id}"


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def _transfer(figs: list[dict]) -> str:
    valid = [f["mse_norm"] for f in figs if f.get("valid") and f.get("mse_norm") is not None]
    invalid = [f["invalid_mse_norm"] for f in figs if f.get("invalid_mse_norm") is not None]
    text = f"{_stat(valid)} ({len(valid)}/{len(figs)} valid)"
    return text + (f", invalid ones {_stat(invalid)}" if invalid else "")


def print_table(result: dict, headline: str) -> None:
    print(f"\nTabula Muris ({headline}), split seeds {sorted(result['seeds'])}, test half")
    print("| row | " + " | ".join(COLUMNS) + " | other datasets (mse_norm, valid) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name, per_seed in result["rows"].items():
        cells = []
        for col in COLUMNS:
            got = [s[headline].get(col) for s in per_seed.values() if headline in s]
            if col == "valid":
                cells.append(f"{sum(bool(v) for v in got)}/{len(got)}")
            elif col in ("mse_norm", "poisson_norm") and all(v is None for v in got):
                invalid = [s[headline].get(f"invalid_{col}") for s in per_seed.values()]
                shown = _stat([float(v) for v in invalid if isinstance(v, int | float)])
                cells.append(f"- (invalid: {shown})" if shown != "-" else "-")
            else:
                cells.append(_stat([float(v) for v in got if isinstance(v, int | float)]))
        others = {}
        for s in per_seed.values():
            for ds, fig in s.items():
                if ds != headline and isinstance(fig, dict):
                    others.setdefault(ds, []).append(fig)
        other = "; ".join(f"{ds}: {_transfer(figs)}" for ds, figs in others.items())
        print(f"| {name} | " + " | ".join(cells) + f" | {other} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--row", action="append", default=[], help="ROW:SEED=RUN_DIR")
    parser.add_argument("--launch", action="append", default=[], choices=list(LOOP_ROWS))
    parser.add_argument("--redo", action="append", default=[], help="score this row again")
    parser.add_argument("--only", action="append", default=[], help="score only these rows")
    parser.add_argument("--set", action="append", default=[], help="key=value for launched runs")
    args = parser.parse_args()
    result = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"rows": {}, "seeds": []}
    result["machine"] = {"cpu": platform.processor() or platform.machine()}
    runs: dict[tuple[str, int], str] = {}
    for spec in args.row:
        row, where = spec.split("=", 1)
        name, seed = row.split(":")
        runs[(name, int(seed))] = where
    for name in args.launch:
        for seed in args.seeds:
            runs[(name, seed)] = launch(name, seed, args.data, args.set)
    fixed = {"no_denoising": None, "perfect": None, "magic": template_with({}),
             "magic_ttt": MAGIC_TTT, "knobs": template_with(KNOBS)}  # fmt: skip
    headline = ""
    for seed in args.seeds:
        task = DenoiseTask(data=args.data, seed=seed)
        headline = task.headline
        try:
            wanted: dict[str, tuple[str | None, str]] = {
                k: (v, "fixed") for k, v in fixed.items() if not args.only or k in args.only
            }
            for (name, s), where in runs.items():
                if s == seed:
                    wanted[name] = program_of_run(Path(where), task)
            for name, (source, origin) in wanted.items():
                stored = result["rows"].setdefault(name, {})
                if str(seed) in stored and name not in args.redo and (name, seed) not in runs:
                    continue
                print(f"  {name}, seed {seed} ...", flush=True)
                start = time.perf_counter()
                if source is None:
                    figures = control_figures(task, name)
                else:
                    figures = program_figures(task, source)
                figures["origin"] = origin
                figures["wall_s"] = time.perf_counter() - start
                stored[str(seed)] = figures
                result["seeds"] = sorted(set(result["seeds"]) | {seed})
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                RESULTS.write_text(json.dumps(result, indent=1, default=_plain))
        finally:
            task.close()
    print_table(result, headline)


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x).__name__)


if __name__ == "__main__":
    main()
