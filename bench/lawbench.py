"""LawBench on SIA's split: the loop's versions beside a classical reference, in one table.

    python bench/lawbench.py                       # classical reference only (seconds)
    python bench/lawbench.py --run both=runs/R1 --run harness=runs/R2 --run weights=runs/R3
    python bench/lawbench.py --launch              # runs the three loops first (hours on 2 cores)

For each run directory it reads, from the store only: generation 0's val and test top-1, the
best version's, and the wall minutes each lever spent. Test is reported on all 913 cases and
without the 12 texts that also occur verbatim in train.csv. The classical reference is TF-IDF
character n-grams + LinearSVC fitted on the same train split. JSON: bench/results/lawbench.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
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
LAUNCH = {
    "both": [],
    "harness": ["--set", "loop.levers=['harness']"],
    "weights": ["--set", "loop.levers=['weights']"],
}


def duplicate_test_ids(task: LawBenchTask) -> set[str]:
    with (task.dir / "train.csv").open(newline="", encoding="utf-8") as f:
        train_texts = {r["text"] for r in csv.DictReader(f)}
    return {i.id for i in task.instances("test") if i.inputs["text"] in train_texts}


def _top1(task: LawBenchTask, instances, predictions, skip: set[str] = frozenset()) -> dict:
    scored = [
        task.score(i, p).value
        for i, p in zip(instances, predictions, strict=True)
        if i.id not in skip
    ]
    return {"top1": sum(scored) / len(scored), "n": len(scored)}


def classical(task: LawBenchTask, dupes: set[str], cfg: RunConfig) -> dict:
    start = time.perf_counter()
    train = task.instances("train")
    vec = TfidfVectorizer(
        analyzer="char", ngram_range=(1, 3), min_df=2, sublinear_tf=True, max_features=300_000
    )
    x = vec.fit_transform([i.inputs["text"] for i in train])
    clf = LinearSVC(C=0.5).fit(x, [task.label(i) for i in train])
    out = {"method": "tfidf-char1-3 + LinearSVC"}
    for split, instances in (
        ("val", val_subset(task, cfg)),
        ("val_all", task.instances("val")),
        ("test", task.instances("test")),
    ):
        preds = list(clf.predict(vec.transform([i.inputs["text"] for i in instances])))
        out[split] = _top1(task, instances, preds)
        if split == "test":
            out["test_without_duplicates"] = _top1(task, instances, preds, dupes)
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def _test_top1(store: Store, version_id: str, dupes: set[str]) -> dict:
    trajs = [t for t in store.trajectories(version_id, "test")]
    if not trajs:
        return {}

    def top1(ts):
        return {"top1": sum(t.score.value if t.score else 0.0 for t in ts) / len(ts), "n": len(ts)}

    return {
        "test": top1(trajs),
        "test_without_duplicates": top1([t for t in trajs if t.instance_id not in dupes]),
    }


def from_run(root: Path, dupes: set[str]) -> dict:
    store = Store.open(root)
    val = {e.version_id: e for e in store.evaluations("val")}
    best = best_version(store)
    minutes: dict[str, float] = {}
    decisions = {d.generation: d for d in store.decisions()}
    for v in store.versions():
        if v.generation > 0 and v.generation in decisions:
            lever = decisions[v.generation].lever.value
            minutes[lever] = minutes.get(lever, 0.0) + v.detail.get("minutes", 0.0)
    return {
        "run": str(root),
        "generation0": {"val": val["v0"].value, "n_val": val["v0"].n},
        "best": {
            "version": best.version_id,
            "adapter": best.adapter,
            "val": val[best.version_id].value,
            **_test_top1(store, best.version_id, dupes),
        },
        "versions": [
            {
                "version": v.version_id,
                "status": v.status,
                "note": v.note,
                "val": val[v.version_id].value if v.version_id in val else None,
            }
            for v in store.versions()
        ],
        "minutes_per_lever": {k: round(m, 1) for k, m in minutes.items()},
        "decisions": [
            {
                "generation": d.generation,
                "lever": d.lever.value,
                "method": d.method,
                "rationale": d.rationale,
            }
            for d in store.decisions()
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--run", action="append", default=[], help="name=RUN_DIR")
    parser.add_argument("--launch", action="store_true", help="run the three loops first")
    args = parser.parse_args()
    cfg = RunConfig(data=args.data)
    task = load_task("lawbench", args.data)
    assert isinstance(task, LawBenchTask)
    dupes = duplicate_test_ids(task)
    runs = dict(r.split("=", 1) for r in args.run)
    if args.launch:
        for name, extra in LAUNCH.items():
            run_id = time.strftime("%Y%m%d-%H%M%S-bench-") + name
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "sialoop.cli",
                    "run",
                    "--task",
                    "lawbench",
                    "--data",
                    str(args.data),
                    "--run-id",
                    run_id,
                    *extra,
                ],
                check=True,
            )
            runs[name] = f"runs/{run_id}"
    result = {
        "duplicates_in_test": len(dupes),
        "classical": classical(task, dupes, cfg),
        "runs": {name: from_run(Path(root), dupes) for name, root in runs.items()},
    }
    c = result["classical"]
    print(f"{'system':28} {'val':>8} {'test':>8} {'test-dup':>9}")
    print(
        f"{'classical TF-IDF+SVC':28} {c['val']['top1']:8.4f} {c['test']['top1']:8.4f} {c['test_without_duplicates']['top1']:9.4f}"
    )
    for name, r in result["runs"].items():
        b = r["best"]
        print(f"{name + ' gen 0':28} {r['generation0']['val']:8.4f}")
        t, td = b.get("test", {}).get("top1"), b.get("test_without_duplicates", {}).get("top1")
        print(
            f"{name + ' best ' + b['version']:28} {b['val']:8.4f} {t if t is not None else float('nan'):8.4f} {td if td is not None else float('nan'):9.4f}   minutes {r['minutes_per_lever']}"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, ensure_ascii=False, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
