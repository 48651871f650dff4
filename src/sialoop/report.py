"""What a run holds: versions, splits, scores, n and seconds, read from the store only."""

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
                "value": e.value,
                "n": e.n,
                "errors": e.n_errors,
                "seconds": round(e.seconds, 1),
                "forced": e.forced,
            }
        )
    return {
        "run_id": info.run_id,
        "task": info.task,
        "status": info.status,
        "val_size": info.config.get("split", {}).get("val_size"),
        "evaluations": rows,
        "decisions": [
            {"generation": d.generation, "lever": d.lever.value, "rationale": d.rationale}
            for d in store.decisions()
        ],
    }


def report_table(data: dict[str, Any]) -> Table:
    val = "all" if not data["val_size"] else data["val_size"]
    title = f"run {data['run_id']} ({data['task']}, {data['status']}; val subset: {val} items)"
    table = Table(title=title)
    for col in ("version", "gen", "status", "split", "metric", "score", "n", "errors", "seconds"):
        table.add_column(
            col, justify="right" if col in {"score", "n", "errors", "seconds"} else "left"
        )
    for r in data["evaluations"]:
        score = "-" if r["value"] is None else f"{r['value']:.4f}"
        split = r["split"] + ("*" if r["forced"] else "")
        table.add_row(
            r["version"],
            str(r["generation"]),
            str(r["status"]),
            split,
            r["metric"],
            score,
            str(r["n"]),
            str(r["errors"]),
            f"{r['seconds']:.0f}",
        )
    if any(r["forced"] for r in data["evaluations"]):
        table.caption = "* forced re-score: test was scored more than once"
    return table
