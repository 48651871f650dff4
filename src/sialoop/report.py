"""What a run holds: versions, splits, scores beside their cost, n and seconds, the run's status
(with the reason when it failed), and the best version's val score beside its score on val
items the search never used. Read from the store only."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from sialoop.store import Store


def report_data(store: Store) -> dict[str, Any]:
    info = store.run_info()
    versions = {v.version_id: v for v in store.versions()}
    rows = []
    for e in store.evaluations():
        v = versions.get(e.version_id)
        rows.append(
            {
                "version": e.version_id,
                "generation": v.generation if v else None,
                "status": v.status if v else None,
                "adapter": v.adapter if v else None,
                "split": e.split,
                "metric": e.metric,
                "direction": e.direction,
                "value": e.value,
                "n": e.n,
                "errors": e.n_errors,
                "seconds": round(e.seconds, 1),
                "seconds_per_item": e.seconds_per_item,
                "tokens_per_item": e.tokens_per_item,
                "forced": e.forced,
            }
        )
    incumbent = store.incumbent()
    best = incumbent.version_id if incumbent else None
    by_split = {r["split"]: r["value"] for r in rows if r["version"] == best and not r["forced"]}
    return {
        "run_id": info.run_id,
        "task": info.task,
        "status": info.status,
        "reason": info.reason,
        "val_size": info.config.get("split", {}).get("val_size"),
        "best": best,
        "best_val": by_split.get("val"),
        "best_holdout": by_split.get("holdout"),
        "best_test": by_split.get("test"),
        "evaluations": rows,
        "versions": [
            {
                "version": v.version_id,
                "parent": v.parent_id,
                "generation": v.generation,
                "status": v.status,
                "note": v.note,
                "error": v.detail.get("error"),
                "verdict": (v.detail.get("gate") or {}).get("verdict"),
            }
            for v in versions.values()
        ],
        "decisions": [
            {
                "generation": d.generation,
                "lever": d.lever.value,
                "method": d.method,
                "rule": d.evidence.get("rule"),
                "rationale": d.rationale,
            }
            for d in store.decisions()
        ],
    }


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def report_table(data: dict[str, Any]) -> Table:
    val = "all" if not data["val_size"] else data["val_size"]
    status = data["status"] + (f": {data['reason']}" if data.get("reason") else "")
    title = f"run {data['run_id']} ({data['task']}, {status}; val subset: {val} items)"
    table = Table(title=title)
    cols = ("version", "gen", "status", "split", "metric", "score", "s/item", "tokens/item")
    for col in (*cols, "n", "errors", "seconds"):
        table.add_column(col, justify="left" if col in cols[:5] else "right")
    for r in data["evaluations"]:
        arrow = "↑" if r["direction"] == "higher" else "↓"
        table.add_row(
            r["version"],
            str(r["generation"]),
            str(r["status"]),
            r["split"] + ("*" if r["forced"] else ""),
            f"{r['metric']} {arrow}",
            _num(r["value"]),
            _num(r["seconds_per_item"], ".2f"),
            _num(r["tokens_per_item"], ".0f"),
            str(r["n"]),
            str(r["errors"]),
            f"{r['seconds']:.0f}",
        )
    notes = []
    if data.get("best"):
        notes.append(
            f"best {data['best']}: val {_num(data['best_val'])}, val items the search never "
            f"used {_num(data['best_holdout'])}, test {_num(data['best_test'])}"
        )
    if any(r["forced"] for r in data["evaluations"]):
        notes.append("* forced re-score: test was scored more than once")
    table.caption = "\n".join(notes) or None
    return table
