"""Paired non-inferiority test on LawBench test: the current best (NEW) against the old code's.

NEW is `test_per_case["both"]` in bench/results/lawbench.json (the best version's top-1 per test
instance id). OLD is v3 of the old code's LawBench run (commit a070891): its generation-0
template after the old Meta-Agent's own three moves (prior weight 3.0, then 30.0, then the
classifier shortlist), base model, scored on all 913 test cases by the old evaluation path
(old store, old policy endpoint, old sandbox workers). Its per-case scores go to
bench/results/lawbench_paired.json beside the test.

    mkdir -p /tmp/sialoop-old && git archive a070891 | tar -x -C /tmp/sialoop-old   # once
    python bench/lawbench_paired.py --score-old /tmp/sialoop-old --old-run /tmp/old-run/v3test
    python bench/lawbench_paired.py ... --retry-errors     # also rerun errored cases (timeouts)
    python bench/lawbench_paired.py                        # recompute from the stored per-case
    python bench/lawbench_paired.py --old-run /tmp/old-run/v3test   # re-read the old store

`--score-old` (about 25-45 min on 2 cores) runs the scoring in a child process whose PYTHONPATH
puts the old `src/` first (checked there, also inside a sandbox worker) and resumes: cases
already in the old store are not rerun. The test: d = (b - c) / n with b = NEW right & OLD wrong, c = OLD right & NEW
wrong; H0 d <= -margin (1 point), z = (d + margin) / SE, SE = sqrt(b + c - (b - c)^2 / n) / n,
one-sided p and 95% lower bound d - 1.645 SE; also without the test texts that occur in train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "lawbench_paired.json"
NEW_RESULTS = HERE / "results" / "lawbench.json"
OLD_COMMIT = "a070891"
MARGIN = 0.01
Z95 = 1.6448536269514722  # one-sided 95%
# The old run's moves after generation 0, each with the note the old run recorded for it.
OLD_MOVES = (
    (
        "scoring",
        {"hint": "prior_up", "prior_gap": 0.42},
        "prior weight 3.0 (was 0.0): the prior beats the answer by 42%",
    ),
    (
        "scoring",
        {"hint": "prior_up", "prior_gap": 0.33},
        "prior weight 30.0 (was 3.0): the prior beats the answer by 33%",
    ),
    ("shortlist", {}, "shortlist from a linear classifier fitted on train"),
)
PROBE = "def solve(instance, llm):\n    import sialoop\n    return sialoop.__file__\n"


def _old_child(old_src: Path, run_dir: Path, data: Path, retry: bool) -> None:
    """Runs with the OLD package on sys.path: build the old v3 and score it on test; with
    `retry`, errored test trajectories (timeouts) are deleted first and so scored again."""
    import sialoop

    here = Path(sialoop.__file__).resolve()
    assert here.is_relative_to(old_src.resolve()), f"imported {here}, not the old code"
    from sialoop.agents.meta import OfflineMetaAgent
    from sialoop.config import load_config
    from sialoop.harness.sandbox import Sandbox
    from sialoop.loop import generation_zero, new_run
    from sialoop.policy.dtype import resolve_dtype
    from sialoop.policy.launch import serve_policy
    from sialoop.records import Decision, Lever, Trajectory, Version
    from sialoop.rollout import RolloutContext, evaluate
    from sialoop.store import Store
    from sialoop.tasks import load_task

    overrides = {"data": str(data), "runs_dir": str(run_dir.parent), "policy.dtype": "auto"}
    cfg = load_config(None, overrides)
    task = load_task(cfg.task, cfg.data, seed=cfg.seed, val_fraction=cfg.split.val_fraction)
    fresh = not (run_dir / "run.db").exists()
    store = new_run(cfg, task, run_dir.name) if fresh else Store.open(run_dir)
    parent = generation_zero(store, task, cfg)
    meta = OfflineMetaAgent()
    for g, (focus, hint, note) in enumerate(OLD_MOVES, start=1):
        if any(v.version_id == f"v{g}" for v in store.versions()):
            parent = store.version(f"v{g}")
            continue
        source = store.path(parent.harness_path).read_text()
        decision = Decision(
            run_id=parent.run_id,
            generation=g,
            lever=Lever.harness,
            rationale=note,
            settings={"focus": focus, **hint},
        )
        op = meta.propose(source, decision, tried=set())
        assert op is not None and op.why == note, f"old Meta-Agent proposed {op}, not {note!r}"
        parent = Version(
            version_id=f"v{g}",
            run_id=parent.run_id,
            parent_id=parent.version_id,
            generation=g,
            harness_path=store.write_harness(f"v{g}", meta.write(source, op)),
            status="accepted",
            note=op.why,
            detail={"operator": op.key},
        )
        store.put_version(parent)
    probe = run_dir / "probe_harness.py"
    probe.write_text(PROBE)
    with Sandbox(probe, policy_url=None, adapter="base", scratch_root=store.path("scratch")) as sb:
        worker_file = sb.solve({"text": ""}, "probe").output
    assert Path(worker_file).resolve().is_relative_to(old_src.resolve()), worker_file
    instances = task.instances("test")
    errored = [t for t in store.trajectories(parent.version_id, "test") if t.error is not None]
    if retry and errored:
        with store.transaction() as db:
            db.executemany(
                "DELETE FROM trajectories WHERE trajectory_id = ?",
                [(t.trajectory_id,) for t in errored],
            )
    retried = [{"id": t.instance_id, "error": t.error.message} for t in errored if retry]
    started, done = time.time(), len(store.trajectories(parent.version_id, "test"))
    print(f"old {parent.version_id}: {done}/{len(instances)} already scored", flush=True)

    def progress(t: Trajectory) -> None:
        nonlocal done
        done += 1
        if done % 25 == 0 or done == len(instances):
            print(f"{done}/{len(instances)} {time.strftime('%H:%M:%S')}", flush=True)

    with serve_policy(cfg.policy, store, {}) as url:
        ctx = RolloutContext(store, task, parent, url, cfg.sandbox)
        ev = evaluate(ctx, instances, progress)
    harness = store.path(parent.harness_path).read_bytes()
    past = run_dir / "provenance.json"
    calls = json.loads(past.read_text())["calls"] if past.exists() else []
    calls.append({"started": started, "finished": time.time(), "retried": retried})
    info = {
        "sialoop_file": str(here),
        "worker_sialoop_file": worker_file,
        "dtype": resolve_dtype(cfg.policy.dtype),
        "config": {"policy": cfg.policy.model_dump(), "sandbox": cfg.sandbox.model_dump()},
        "version": parent.version_id,
        "harness_sha256": hashlib.sha256(harness).hexdigest(),
        "evaluation": {"value": ev.value, "n": ev.n, "errors": ev.n_errors, "seconds": ev.seconds},
        "errors": [
            {"id": t.instance_id, "error": t.error.message}
            for t in store.trajectories(parent.version_id, "test")
            if t.error is not None
        ],
        "calls": calls,
        "wall_minutes": round(sum(c["finished"] - c["started"] for c in calls) / 60, 1),
    }
    past.write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


def score_old(old_root: Path, run_dir: Path, data: Path, retry: bool) -> None:
    """Score the old v3 in a child process that imports the old package (resumable)."""
    env = {**os.environ, "PYTHONPATH": str(old_root / "src")}
    cmd = [sys.executable, __file__, "--_child", str(old_root / "src"), str(run_dir), str(data)]
    cmd += ["retry"] if retry else ["keep"]
    subprocess.run(cmd, env=env, check=True, cwd=old_root)


def read_old_store(run_dir: Path) -> dict[str, float]:
    """The old v3's test score per instance id (an errored trajectory scores 0), read raw."""
    db = sqlite3.connect(f"file:{run_dir / 'run.db'}?mode=ro", uri=True)
    rows = db.execute("SELECT record FROM trajectories WHERE version_id='v3' AND split='test'")
    records = [json.loads(r) for (r,) in rows]
    return {r["instance_id"]: (r["score"] or {}).get("value", 0.0) for r in records}


def paired(old: dict[str, float], new: dict[str, float], skip: set[str]) -> dict[str, Any]:
    ids = sorted(set(old) - skip)
    n = len(ids)
    b = sum(new[i] == 1 and old[i] == 0 for i in ids)
    c = sum(old[i] == 1 and new[i] == 0 for i in ids)
    d = (b - c) / n
    se = math.sqrt(b + c - (b - c) ** 2 / n) / n
    out: dict[str, Any] = {
        "n": n,
        "old_correct": int(sum(old[i] for i in ids)),
        "new_correct": int(sum(new[i] for i in ids)),
        "b": b,
        "c": c,
        "d": d,
        "se": se,
    }
    if se > 0:
        z = (d + MARGIN) / se
        out |= {"z": z, "p_one_sided": 0.5 * math.erfc(z / math.sqrt(2)), "lower95": d - Z95 * se}
    else:
        out |= {"z": None, "p_one_sided": None, "lower95": d}  # no discordant pair
    # Exact McNemar (two-sided binomial on the b + c discordant pairs, H0 b = c) as a check.
    k, m = min(b, c), b + c
    out["mcnemar_exact_p"] = min(1.0, 2 * sum(math.comb(m, j) for j in range(k + 1)) / 2**m)
    out["non_inferior"] = out["lower95"] > -MARGIN
    if m == 0:
        out["note"] = "b = c = 0: the per-case sets are identical; non-inferiority holds trivially"
    elif m < 25:
        out["note"] = f"only {m} discordant pairs: the normal approximation is rough"
    return out


def _cpu() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text()
    model = next(ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln)
    flags = set(info.split())
    return {
        "model": model,
        "cores": os.cpu_count(),
        "native_bf16": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "platform": platform.platform(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--score-old", type=Path, help="the old code's folder (git archive)")
    parser.add_argument("--old-run", type=Path, help="the old store (written by --score-old)")
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    parser.add_argument(
        "--retry-errors", action="store_true", help="with --score-old: rerun errored cases"
    )
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        *paths, retry = args._child
        _old_child(*(Path(a).resolve() for a in paths), retry=retry == "retry")
        return
    from lawbench import duplicate_test_ids  # bench/lawbench.py, with the NEW package
    from sialoop.tasks import load_task

    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    old_info = previous.get("old", {})
    if args.score_old:
        assert args.old_run, "--score-old needs --old-run"
        score_old(
            args.score_old.resolve(), args.old_run.resolve(), args.data.resolve(), args.retry_errors
        )
    if args.old_run:
        old_info = {
            "run": str(args.old_run),
            "per_case": read_old_store(args.old_run),
            **json.loads((args.old_run / "provenance.json").read_text()),
        }
    old = old_info["per_case"]
    new_results = json.loads(NEW_RESULTS.read_text())
    new = new_results["test_per_case"]["both"]
    assert set(old) == set(new), f"case ids differ: {len(set(old) ^ set(new))} not shared"
    dupes = duplicate_test_ids(load_task("lawbench", args.data))
    assert dupes <= set(new), "duplicate ids outside the test set"

    def git(*cmd: str) -> str:
        return subprocess.run(["git", "-C", str(HERE), *cmd], capture_output=True, text=True).stdout

    head = git("rev-parse", "--short", "HEAD").strip()
    # The commit that stored NEW's per-case scores (the code that scored the new run).
    new_commit = git("log", "-1", "--format=%h %s", "--", str(NEW_RESULTS)).strip()
    result = {
        "computed_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": _cpu(),
        "margin": MARGIN,
        "commits": {
            "old": OLD_COMMIT,
            "checkout_now": head,
            "new_results_commit": new_commit,
            "new_run": new_results["runs"]["both"]["run"],
            "new_version": new_results["runs"]["both"]["best"]["version"],
        },
        "tests": {
            "all": paired(old, new, set()),
            "without_duplicates": paired(old, new, dupes),
        },
        "duplicate_ids": sorted(dupes, key=int),
        "old": old_info,
    }
    print(
        f"{'cases':20} {'n':>4} {'old':>4} {'new':>4} {'b':>3} {'c':>3} {'d':>8} "
        f"{'z':>7} {'p':>9} {'lower95':>8}  non-inferior (margin {MARGIN})"
    )
    for name, t in result["tests"].items():
        z = f"{t['z']:7.2f}" if t["z"] is not None else f"{'–':>7}"
        p = f"{t['p_one_sided']:9.2e}" if t["p_one_sided"] is not None else f"{'–':>9}"
        print(
            f"{name:20} {t['n']:4} {t['old_correct']:4} {t['new_correct']:4} {t['b']:3} "
            f"{t['c']:3} {t['d']:+8.4f} {z} {p} {t['lower95']:+8.4f}  "
            f"{t['non_inferior']}" + (f"  ({t['note']})" if "note" in t else "")
        )
    RESULTS.write_text(json.dumps(result, ensure_ascii=False, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
