"""The default `make run`, timed from a fresh clone, and its LawBench test top-1 paired against
the reference run's (the both-levers run at 75.1 %, `test_per_case["both"]` in
bench/results/lawbench.json) on the same 913 cases, with a non-inferiority margin of 1 point.

    rm -rf /tmp/r && mkdir /tmp/r && git clone -q . /tmp/r/main && ln -s "$PWD/../shared" /tmp/r/shared
    cd /tmp/r/main && SIALOOP_HOME=/tmp/r/home /usr/bin/time -v make run > /tmp/r/run.log 2>&1
    python bench/make_run.py /tmp/r/main/runs/<RUN> --log /tmp/r/run.log

SIALOOP_HOME pointing at an empty folder makes the model cache empty, as on a fresh machine.
Prints the wall time (from /usr/bin/time's report in the log), every version with its lever,
val score and seconds per item, the Decisions, and the paired test; writes
bench/results/make_run.json (one entry per run directory, earlier entries kept).
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from sialoop.evaluator import best_version
from sialoop.policy.dtype import native_bf16
from sialoop.store import Store

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lawbench_paired import paired  # noqa: E402  (the same test as the earlier comparison)

RESULTS = HERE / "results" / "make_run.json"
REFERENCE = HERE / "results" / "lawbench.json"
PAIRED = HERE / "results" / "lawbench_paired.json"


def time_report(log: Path) -> dict[str, Any]:
    """Wall seconds and peak RSS from `/usr/bin/time -v`'s report at the end of `log`."""
    text = log.read_text(errors="replace")
    out: dict[str, Any] = {}
    if m := re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text):
        parts = [float(p) for p in m.group(1).split(":")]
        out["wall_s"] = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    if m := re.search(r"Maximum resident set size \(kbytes\): (\d+)", text):
        out["max_rss_mb"] = int(m.group(1)) / 1024
    if m := re.search(r"Exit status: (\d+)", text):
        out["exit_status"] = int(m.group(1))
    return out


def read_run(root: Path) -> dict[str, Any]:
    store = Store.open(root)
    best = best_version(store)
    decisions = {d.generation: d for d in store.decisions()}
    val = {e.version_id: e for e in store.evaluations("val")}
    versions = []
    for v in store.versions():
        e = val.get(v.version_id)
        d = decisions.get(v.generation)
        trajectories = store.trajectories(v.version_id, "val")
        seconds = [t.seconds for t in trajectories if t.seconds is not None]
        versions.append({
            "version": v.version_id, "generation": v.generation, "status": str(v.status),
            "lever": d.lever.value if d else None, "method": d.method if d else None,
            "val": e.value if e else None, "seconds_per_item":
                sum(seconds) / len(seconds) if seconds else None,
            "note": v.note,
        })  # fmt: skip
    test = {
        t.instance_id: t.score.value if t.score else 0.0
        for t in store.trajectories(best.version_id, "test")
    }
    return {
        "best": best.version_id,
        "versions": versions,
        "decisions": [
            {"generation": g, "lever": d.lever.value, "method": d.method, "why": d.rationale}
            for g, d in sorted(decisions.items())
        ],
        "test_per_case": test,
        "status": store.run_info().status,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", type=Path, help="the run directory `make run` wrote")
    p.add_argument("--log", type=Path, help="make run's output, with /usr/bin/time -v's report")
    p.add_argument("--label", default="after", help="name of this entry in the JSON")
    args = p.parse_args()
    run = read_run(args.run)
    reference = json.loads(REFERENCE.read_text())
    ref = reference["test_per_case"]["both"]
    dupes = set(json.loads(PAIRED.read_text())["duplicate_ids"])  # test texts also in train
    new = run["test_per_case"]
    missing = sorted(set(ref) - set(new))
    tests = {
        "all": paired(ref, new, set(missing)),
        "without_duplicates": paired(ref, new, set(missing) | dupes),
    }
    timing = time_report(args.log) if args.log else {}
    print(f"run {args.run.name}: status {run['status']}, best {run['best']}")
    if "wall_s" in timing:
        print(f"make run wall {timing['wall_s'] / 60:.1f} min, peak RSS "
              f"{timing.get('max_rss_mb', 0):.0f} MB, exit {timing.get('exit_status')}")  # fmt: skip
    for v in run["versions"]:
        val = "-" if v["val"] is None else f"{v['val']:.4f}"
        sec = "-" if v["seconds_per_item"] is None else f"{v['seconds_per_item']:.3f}"
        print(f"  {v['version']:<4} gen {v['generation']} {v['lever'] or '-':<9}"
              f"{v['method'] or '':<5} {v['status']:<9} val {val}  s/item {sec}  {v['note'][:60]}")  # fmt: skip
    for d in run["decisions"]:
        print(f"  gen {d['generation']} {d['lever']}: {d['why'][:220]}")
    for name, t in tests.items():
        print(f"  test {name}: n {t['n']}, reference {t['old_correct']}, this run "
              f"{t['new_correct']} ({t['new_correct'] / t['n']:.4f}), b {t['b']} c {t['c']}, "
              f"lower95 {t['lower95']:+.4f}, non-inferior at 1 point: {t['non_inferior']}")  # fmt: skip
    if missing:
        print(f"  {len(missing)} reference cases were not scored by this run")
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    previous[args.label] = {
        "computed_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "bf16": native_bf16()},
        "run": str(args.run),
        "timing": timing,
        "tests": tests,
        **{k: v for k, v in run.items() if k != "test_per_case"},
        "test_per_case": new,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(previous, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
