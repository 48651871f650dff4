"""LawBench on SIA's split: the loop's versions beside a classical reference, in one table.

    python bench/lawbench.py                       # classical reference only (seconds)
    python bench/lawbench.py --run both=runs/R1 --run harness=runs/R2 --run weights=runs/R3
    python bench/lawbench.py --launch              # runs every row's loop first (hours on 2 cores)
    python bench/lawbench.py --launch zero-shot --launch weights --set split.test_size=300

Rows: `zero-shot` (the base model alone: no examples, no shortlist, greedy continuation matched
to a charge; generation 0 only), `generation0` (the reference harness, no generation after it),
`harness` and `weights` (the loop with one lever), `both` (the loop with both levers). For each
run directory it reads, from the store only: generation 0's val top-1, the best version's val
and test top-1, and the wall minutes each lever spent. Test is reported on all test cases scored
and without the 12 texts that also occur verbatim in train.csv; `n` says how many were scored
(`--set split.test_size=N` scores the first N only, and the table shows it; when rows differ in
n, the column test@N gives every row on the N cases they all scored). The classical
reference is TF-IDF character n-grams + LinearSVC fitted on the same train split.
JSON: bench/results/lawbench.json (rows already there and not re-run are kept).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from importlib.resources import files
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.svm import LinearSVC

from sialoop.config import RunConfig
from sialoop.evaluator import best_version
from sialoop.loop import val_subset
from sialoop.store import Store
from sialoop.tasks import load_task
from sialoop.tasks.lawbench import LawBenchTask

RESULTS = Path(__file__).parent / "results" / "lawbench.json"
ZERO_SHOT = files("sialoop.tasks.lawbench") / "templates" / "zeroshot.py"
LAUNCH = {
    "zero-shot": ["--set", "loop.generations=0", "--set", f"harness='{ZERO_SHOT}'"],
    "generation0": ["--set", "loop.generations=0"],
    "harness": ["--set", "loop.levers=['harness']"],
    "weights": ["--set", "loop.levers=['weights']"],
    "both": [],
}


def duplicate_test_ids(task: LawBenchTask) -> set[str]:
    with (task.dir / "train.csv").open(newline="", encoding="utf-8") as f:
        train_texts = {r["text"] for r in csv.DictReader(f)}
    return {i.id for i in task.instances("test") if i.inputs["text"] in train_texts}


def _top1(scores: dict[str, float], skip: set[str] = frozenset()) -> dict:
    """Mean score over instance ids, leaving out `skip`."""
    kept = [v for i, v in scores.items() if i not in skip]
    return {"top1": sum(kept) / len(kept), "n": len(kept)}


def _test_top1(scores: dict[str, float], dupes: set[str]) -> dict:
    if not scores:
        return {}
    return {"test": _top1(scores), "test_without_duplicates": _top1(scores, dupes)}


def classical(task: LawBenchTask, dupes: set[str], cfg: RunConfig) -> tuple[dict, dict]:
    """The reference's results, and its test score per instance id."""
    start = time.perf_counter()
    train = task.instances("train")
    vec = TfidfVectorizer(
        analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True, max_features=300_000
    )
    x = vec.fit_transform([i.inputs["text"] for i in train])
    clf = LinearSVC(C=0.5).fit(x, [task.label(i) for i in train])
    splits = {
        "val": val_subset(task, cfg),
        "val_all": task.instances("val"),
        "test": task.instances("test"),
    }
    scores: dict[str, dict[str, float]] = {}
    for split, instances in splits.items():
        preds = clf.predict(vec.transform([i.inputs["text"] for i in instances]))
        scores[split] = {
            i.id: task.score(i, p).value for i, p in zip(instances, preds, strict=True)
        }
    out = {
        "method": "tfidf-char1-3 + LinearSVC",
        **{split: _top1(s) for split, s in scores.items()},
        "test_without_duplicates": _top1(scores["test"], dupes),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return out, scores["test"]


def on_common_cases(rows: dict[str, dict], scores: dict[str, dict[str, float]]) -> int | None:
    """Adds `test_common` (top-1 on the test cases every row scored) when rows differ in n."""
    scored = {name: s for name, s in scores.items() if s}
    if len(scored) < 2 or len({len(s) for s in scored.values()}) == 1:
        return None
    common = set.intersection(*(set(s) for s in scored.values()))
    for name, s in scored.items():
        rows[name]["test_common"] = {
            "top1": sum(s[i] for i in common) / len(common),
            "n": len(common),
        }
    return len(common)


def from_run(root: Path, dupes: set[str]) -> tuple[dict, dict]:
    """The run's row, and its best version's test score per instance id (empty: not scored)."""
    store = Store.open(root)
    val = {e.version_id: e for e in store.evaluations("val")}
    best = best_version(store)
    scores = {
        t.instance_id: t.score.value if t.score else 0.0
        for t in store.trajectories(best.version_id, "test")
    }
    minutes: dict[str, float] = {}
    decisions = {d.generation: d for d in store.decisions()}
    for v in store.versions():
        if v.generation > 0 and v.generation in decisions:
            lever = decisions[v.generation].lever.value
            minutes[lever] = minutes.get(lever, 0.0) + v.detail.get("minutes", 0.0)
    info = store.run_info()
    evaluations = store.evaluations()
    test = [e for e in evaluations if e.split == "test"]
    return {
        "run": str(root),
        "status": info.status,
        "loop_minutes_budget": info.config["loop"]["minutes"],
        # run start to its last evaluation (test, when scored): the loop and test, not setup
        "wall_minutes": round((max(e.created_at for e in evaluations) - info.created_at) / 60, 1),
        "test_minutes": round(test[-1].seconds / 60, 1) if test else None,
        "generation0": {"val": val["v0"].value, "n_val": val["v0"].n},
        "best": {
            "version": best.version_id,
            "adapter": best.adapter,
            "val": val[best.version_id].value,
            "n_val": val[best.version_id].n,
            **_test_top1(scores, dupes),
        },
        "versions": [
            {
                "version": v.version_id,
                "parent": v.parent_id,
                "status": v.status,
                "note": v.note,
                "val": val[v.version_id].value if v.version_id in val else None,
                "minutes": round(v.detail.get("minutes", 0.0), 1),
                "p_value": v.detail.get("gate", {}).get("p_value"),
            }
            for v in store.versions()
        ],
        "minutes_per_lever": {k: round(m, 1) for k, m in minutes.items()},
        "decisions": [
            {
                "generation": d.generation,
                "lever": d.lever.value,
                "method": d.method,
                "rule": d.evidence.get("rule"),
                "chosen_by": d.evidence.get("chosen_by"),
                "rationale": d.rationale,
            }
            for d in store.decisions()
        ],
    }, scores


def launch(name: str, data: Path, sets: list[str]) -> str:
    run_id = time.strftime("%Y%m%d-%H%M%S-bench-") + name
    extra = [a for s in sets for a in ("--set", s)]
    cmd = [sys.executable, "-m", "sialoop.cli", "run", "--task", "lawbench", "--data", str(data)]
    subprocess.run([*cmd, "--run-id", run_id, *LAUNCH[name], *extra], check=True)
    return f"runs/{run_id}"


def _fmt(x: float | None, width: int) -> str:
    return f"{x:{width}.4f}" if x is not None else f"{'–':>{width}}"


def print_table(result: dict) -> None:
    c, n_common = result["classical"], result.get("test_common_n")
    common = f" {'test@' + str(n_common):>8}" if n_common else ""

    def at_common(row: dict) -> str:
        return f" {_fmt(row.get('test_common', {}).get('top1'), 8)}" if n_common else ""

    print(
        f"{'system':34} {'val':>7} {'n':>4} {'test':>7} {'n':>4} {'test-dup':>8}{common}"
        "  wall min (test)  minutes per lever"
    )
    print(
        f"{'classical TF-IDF+LinearSVC':34} {_fmt(c['val']['top1'], 7)} {c['val']['n']:4} "
        f"{_fmt(c['test']['top1'], 7)} {c['test']['n']:4} "
        f"{_fmt(c['test_without_duplicates']['top1'], 8)}{at_common(c)}  "
        f"{c['seconds'] / 60:8.1f}"
    )
    for name in LAUNCH:
        r = result["runs"].get(name)
        if r is None:
            continue
        b = r["best"]
        test, dup = b.get("test", {}), b.get("test_without_duplicates", {})
        label = f"{name} (best {b['version']})" if name in ("harness", "weights", "both") else name
        print(
            f"{label:34} {_fmt(b['val'], 7)} {b['n_val']:4} {_fmt(test.get('top1'), 7)} "
            f"{test.get('n', 0):4} {_fmt(dup.get('top1'), 8)}{at_common(b)}  "
            f"{r['wall_minutes']:8.1f} ({r['test_minutes'] or 0:.0f})  {r['minutes_per_lever']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--run", action="append", default=[], help="ROW=RUN_DIR")
    parser.add_argument(
        "--launch",
        action="append",
        nargs="?",
        const="all",
        choices=[*LAUNCH, "all"],
        help="run this row's loop first (repeatable; no name: every row)",
    )
    parser.add_argument("--set", action="append", default=[], help="key=value for launched runs")
    args = parser.parse_args()
    cfg = RunConfig(data=args.data)
    task = load_task("lawbench", args.data)
    assert isinstance(task, LawBenchTask)
    dupes = duplicate_test_ids(task)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    runs = {name: r["run"] for name, r in previous.get("runs", {}).items() if name in LAUNCH}
    runs.update(dict(r.split("=", 1) for r in args.run))
    names = list(LAUNCH) if "all" in (args.launch or []) else (args.launch or [])
    for name in names:
        runs[name] = launch(name, args.data, args.set)
    reference, reference_scores = classical(task, dupes, cfg)
    read = {name: from_run(Path(root), dupes) for name, root in runs.items() if Path(root).is_dir()}
    # A row whose run directory is not here (an earlier session's) is kept as it was stored.
    kept = {
        name: {**row, "kept_from_earlier_session": True}
        for name, row in previous.get("runs", {}).items()
        if name not in read
    }
    result = {
        "duplicates_in_test": len(dupes),
        "classical": reference,
        "runs": {**kept, **{name: row for name, (row, _) in read.items()}},
        # Per-case test scores of each row read here, so a later run can be compared paired.
        "test_per_case": {
            **previous.get("test_per_case", {}),
            **{name: sc for name, (_, sc) in read.items()},
        },
    }
    result["test_common_n"] = on_common_cases(
        {"classical": reference, **{name: row["best"] for name, (row, _) in read.items()}},
        {"classical": reference_scores, **{name: sc for name, (_, sc) in read.items()}},
    )
    print_table(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, ensure_ascii=False, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
