"""TriMul on this machine: the eager reference, torch.compile, the loop's versions and the
machine's limit, per benchmark shape and as a geometric mean, in one table.

    python bench/trimul.py                           # the fixed rows not stored yet
    python bench/trimul.py --row harness=runs/R1     # a loop row: R1's best program, re-measured
    python bench/trimul.py --launch harness          # run that row's loop first, then measure it
    python bench/trimul.py --redo knobs              # measure a stored row again

Every row is measured here, by the task's own trusted runtime (`TriMulTask.score`: isolated
worker, fresh renumbered inputs per timed run, every output checked, the eager reference timed
in the same evaluation), on the 7 benchmark shapes under both input distributions (the task's
timed test instances). A row reads as the speedup against the eager float32 reference (the
geometric mean of per-shape median ratios, GPU MODE's ranking) and as a share of the machine's
limit: the operator's GEMM FLOPs at the peak GEMM rate measured here for the best dtype.

Rows: `eager` (the reference program), `compile` (torch.compile of the reference, compile time
in the excluded warm-up), `knobs` (a hand-picked setting of the kernel template's knobs, to
show what the building blocks reach; not the loop's), `limit`, and the loop's `harness`,
`weights` and `both` (the best version of a run with that lever set; the program it answers is
measured, so a generator harness's best proposal is the row).

Resumable: each shape of each row is stored as it finishes in one file per machine,
bench/results/trimul-<machine key>.json (the key covers CPU model, threads and torch), so rows
measured in different sessions sit side by side only when they came from the same machine; a
rerun measures only what is missing (or what --redo names).
"""

from __future__ import annotations

import argparse
import contextlib
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

import torch

from sialoop.evaluator import best_version
from sialoop.harness.operators import apply_assignments
from sialoop.store import Store
from sialoop.tasks.templates import template_source
from sialoop.tasks.trimul.reference import Case
from sialoop.tasks.trimul.task import TriMulTask, cpu_threads, machine_key

RESULTS = Path(__file__).parent / "results"


def results_file(key: str) -> Path:
    return RESULTS / f"trimul-{key}.json"


COMPILED_REFERENCE = '''"""The spec's reference computation under torch.compile (one graph per shape)."""
import torch

from sialoop.tasks.trimul.reference import reference_kernel

_compiled = torch.compile(reference_kernel, dynamic=False)


def custom_kernel(data):
    return _compiled(data)
'''

# A setting picked by hand while building the template's blocks (not the loop's choice).
HAND_KNOBS = {
    "BLOCK": 2048, "PROJ": "fused", "LAYOUT": "channel_first", "PROJ_DTYPE": "bf16x2",
    "TRI_DTYPE": "bfloat16", "OUT_DTYPE": "bf16x3", "INPLACE": True, "ALLOC": "retain",
}  # fmt: skip
GENERATOR = files("sialoop.tasks.trimul") / "templates" / "generator.py"
LOOP_ROWS = {
    "harness": ["--set", "loop.levers=['harness']"],
    "weights": ["--set", "loop.levers=['weights']", "--set", f"harness='{GENERATOR}'"],
    "both": ["--set", f"harness='{GENERATOR}'"],
}
ORDER = ["eager", "compile", "knobs", "harness", "weights", "both"]


def with_knobs(knobs: dict[str, Any]) -> str:
    return apply_assignments(template_source("sialoop.tasks.trimul", "kernel.py"), knobs)


def program_of_run(root: Path, task: TriMulTask) -> tuple[str, str]:
    """The program the run's best version answers (a generator harness's best proposal is
    the trajectory with the best val score), and where it came from."""
    store = Store.open(root)
    best = best_version(store)
    source = store.path(best.harness_path).read_text()
    source = task.adapt_harness(source)
    trajectories = store.trajectories(best.version_id, "val")
    programs = [t for t in trajectories if isinstance(t.output, dict) and t.output.get("program")]
    if programs and "custom_kernel" not in source:
        top = max(programs, key=lambda t: t.score.value if t.score else -math.inf)
        return top.output["program"], f"{root}: {best.version_id}, proposal {top.instance_id}"
    return source, f"{root}: {best.version_id}"


def gemm_peak() -> dict[str, float]:
    """Peak GEMM rate (TFLOP/s) per dtype on this machine: the best of a few shapes the
    kernel's GEMMs have, each timed after a warm-up."""
    peaks: dict[str, float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        best = 0.0
        for m, k, n in ((2048, 2048, 2048), (4096, 768, 640), (1024, 1024, 1024)):
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b
            reps = 5
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - start) / 1e12)
        peaks[str(dtype).removeprefix("torch.")] = round(best, 4)
    return peaks


def machine() -> dict[str, Any]:
    flags = ""
    with contextlib.suppress(OSError, IndexError):
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "key": machine_key("cpu", cpu_threads()), "cpu": model, "threads": cpu_threads(),
        "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
        "torch": torch.__version__, "cuda": torch.cuda.is_available(),
    }  # fmt: skip


def measure_row(
    name: str, source: str, origin: str, task: TriMulTask, stored: dict, redo: bool
) -> dict:
    row = stored if (stored and not redo) else {"origin": origin, "shapes": {}}
    row |= {"origin": origin, "machine": machine()["key"]}
    timed = [i for i in task.instances("test") if i.inputs["role"] == "timed"]
    for inst in timed:
        label = inst.inputs["case"]["label"]
        if label in row["shapes"]:
            continue
        print(f"  {name}: {label} ...", flush=True)
        try:
            d = task.score(inst, {"program": source}).detail
            row["shapes"][label] = {
                k: d[k] for k in ("median_s", "mean_s", "times_s", "reference_median_s",
                                  "margin", "warmup_s", "gflops_per_s", "threads")
            }  # fmt: skip
        except Exception as err:  # a failing shape is a result, stored with why
            row["shapes"][label] = {"error": str(err)[:400]}
        yield row


def launch(name: str, data: Path, sets: list[str]) -> str:
    run_id = time.strftime("%Y%m%d-%H%M%S-bench-trimul-") + name
    extra = [a for s in sets for a in ("--set", s)]
    cmd = [sys.executable, "-m", "sialoop.cli", "run", "--task", "trimul", "--data", str(data)]
    subprocess.run([*cmd, "--run-id", run_id, *LOOP_ROWS[name], *extra], check=True)
    return f"runs/{run_id}"


def summarise(result: dict, shapes: list[str]) -> None:
    """Per row: geometric-mean speedup over the shapes measured, share of the limit, worst
    correctness margin per distribution."""
    limit = result.get("limit", {}).get("shapes", {})
    for row in result["rows"].values():
        got = row["shapes"]
        ok = [s for s in shapes if s in got and "error" in got[s]]
        timed = [s for s in shapes if s in got and "median_s" in got[s]]
        speedups = [got[s]["reference_median_s"] / got[s]["median_s"] for s in timed]
        row["geomean_speedup"] = _geo(speedups) if len(timed) == len(shapes) else None
        shares = [limit[s] / got[s]["median_s"] for s in timed if s in limit]
        row["geomean_share_of_limit"] = _geo(shares) if len(timed) == len(shapes) else None
        row["failed_shapes"] = ok
        for dist in ("normal", "cauchy"):
            margins = [got[s]["margin"] for s in timed if f" {dist} " in s]
            row[f"worst_margin_{dist}"] = max(margins) if margins else None


def _geo(values: list[float]) -> float | None:
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def print_table(result: dict, shapes: list[str]) -> None:
    limit = result["limit"]
    print(f"\nmachine: {result['machine']}")
    print(f"peak GEMM TFLOP/s: {limit['peak_tflops']} (limit at {limit['dtype']})\n")
    short = [s.replace(" nomask", "").replace(" mask", "+m").replace(" H128", "") for s in shapes]
    print(f"{'row':10}" + "".join(f"{s[:15]:>16}" for s in short) + f"{'geomean':>9}{'of lim':>7}")
    ref = {s: [] for s in shapes}
    for row in result["rows"].values():
        for s in shapes:
            if "reference_median_s" in row["shapes"].get(s, {}):
                ref[s].append(row["shapes"][s]["reference_median_s"])
    cells = [f"{statistics.median(ref[s]):15.2f}s" if ref[s] else f"{'-':>16}" for s in shapes]
    print(f"{'ref (s)':10}" + "".join(cells))
    lim = [limit["shapes"][s] for s in shapes]
    print(f"{'limit (s)':10}" + "".join(f"{t:15.3f}s" for t in lim))
    for name in ORDER:
        row = result["rows"].get(name)
        if row is None:
            continue
        cells = []
        for s in shapes:
            d = row["shapes"].get(s)
            if d is None:
                cells.append(f"{'.':>16}")
            elif "error" in d:
                cells.append(f"{'FAIL':>16}")
            else:
                x = d["reference_median_s"] / d["median_s"]
                cells.append(f"{x:8.2f}x {d['median_s']:6.2f}s")
        g, sh = row.get("geomean_speedup"), row.get("geomean_share_of_limit")
        tail = f"{g:8.2f}x{sh:6.0%}" if g is not None and sh is not None else f"{'-':>9}{'-':>7}"
        margins = f"  margin n {row['worst_margin_normal']}, c {row['worst_margin_cauchy']}"
        print(f"{name:10}" + "".join(cells) + tail + margins)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--row", action="append", default=[], help="ROW=RUN_DIR (loop rows)")
    parser.add_argument("--launch", action="append", default=[], choices=list(LOOP_ROWS))
    parser.add_argument("--redo", action="append", default=[], help="measure this row again")
    parser.add_argument("--only", action="append", default=[], help="measure only these rows")
    parser.add_argument("--set", action="append", default=[], help="key=value for launched runs")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per shape and row")
    args = parser.parse_args()
    here = machine()
    out = results_file(here["key"])
    result = json.loads(out.read_text()) if out.exists() else {"rows": {}}
    runs = dict(r.split("=", 1) for r in args.row)
    for name in args.launch:
        runs[name] = launch(name, args.data, args.set)
    task = TriMulTask(args.data, reps=args.reps, ref_reps=1)
    timed = [i for i in task.instances("test") if i.inputs["role"] == "timed"]
    shapes = [i.inputs["case"]["label"] for i in timed]
    result["machine"] = here
    peaks = gemm_peak()
    best_dtype = max(peaks, key=peaks.get)
    result["limit"] = {
        "peak_tflops": peaks, "dtype": best_dtype,
        "shapes": {
            i.inputs["case"]["label"]: Case.of(i.inputs["case"]).flops() / peaks[best_dtype] / 1e12
            for i in timed
        },
    }  # fmt: skip
    programs: dict[str, tuple[str, str]] = {
        "eager": (task.adapt_harness(task.reference_harness()), "kernel template at defaults"),
        "compile": (task.adapt_harness(COMPILED_REFERENCE), "torch.compile of the reference"),
        "knobs": (task.adapt_harness(with_knobs(HAND_KNOBS)), f"hand-picked {HAND_KNOBS}"),
    }
    for name, root in runs.items():
        programs[name] = program_of_run(Path(root), task)
    wanted = args.only or list(programs)
    RESULTS.mkdir(parents=True, exist_ok=True)
    try:
        for name in wanted:
            source, origin = programs[name]
            stored = result["rows"].get(name, {})
            for row in measure_row(name, source, origin, task, stored, name in args.redo):
                result["rows"][name] = row
                summarise(result, shapes)
                out.write_text(json.dumps(result, indent=1))
    finally:
        task.close()
    summarise(result, shapes)
    out.write_text(json.dumps(result, indent=1))
    print_table(result, shapes)
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
