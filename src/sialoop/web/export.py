"""`sialoop report RUN --html`: the dashboard's pages of one run as one self-contained file.

The file holds the page's script and style inline and the API's responses as embedded JSON, so
it opens from disk, offline, with no server. It holds every generation, and a sample of the
trajectories (an even spread over each version and split, failed ones first) within a size
cap; the page states how many were left out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sialoop.web.app import STATIC
from sialoop.web.data import RunReader, run_row

DEFAULT_MAX_TRAJECTORIES = 300
DEFAULT_MAX_BYTES = 20_000_000


def _sample(reader: RunReader, limit: int) -> list[dict[str, Any]]:
    """Up to `limit` trajectory rows: per (version, split) an even share, failed ones first."""
    groups = reader.trajectory_counts()
    if not groups or limit <= 0:
        return []
    share = max(1, limit // len(groups))
    rows: list[dict[str, Any]] = []
    for g in groups:
        failed = reader.trajectories(g["version"], g["split"], error="any", limit=share)["items"]
        rest = share - len(failed)
        clean = reader.trajectories(g["version"], g["split"], error="none", limit=500)
        step = max(1, clean["total"] // rest) if rest > 0 else 0
        picked = clean["items"][::step][:rest] if rest > 0 else []
        if rest > 0 and clean["total"] > 500:  # spread over the whole group, not its first page
            picked = [
                reader.trajectories(g["version"], g["split"], error="none", offset=k, limit=1)[
                    "items"
                ][0]
                for k in range(0, clean["total"], step)
            ][:rest]
        rows += failed + picked
    return rows[:limit]


def export_html(
    run_dir: Path,
    max_trajectories: int = DEFAULT_MAX_TRAJECTORIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[str, dict[str, int]]:
    """(the HTML, {"stored": k, "left_out": m}) for one run directory."""
    reader = RunReader(run_dir)
    name = reader.root.name
    base = f"/runs/{name}"
    summary = reader.summary()
    listing = [run_row(name, summary)]
    responses: dict[str, Any] = {"/runs": listing, f"{base}/summary": summary}
    generations = sorted(
        {v["generation"] for v in summary["versions"]}
        | {d["generation"] for d in summary["decisions"]}
    )
    for g in generations:
        responses[f"{base}/generations/{g}"] = reader.generation(g)
    budget = max_bytes - len(json.dumps(responses, default=str))
    total = sum(g["n"] for g in summary["trajectory_counts"])
    kept: list[dict[str, Any]] = []
    for row in _sample(reader, max_trajectories):
        full = reader.trajectory(row["id"])
        size = len(json.dumps(full, default=str))
        if size > budget:
            continue
        budget -= size
        responses[f"{base}/trajectories/{row['id']}"] = full
        kept.append(row)
    counts = {"stored": len(kept), "left_out": total - len(kept)}
    responses[f"{base}/trajectories"] = {"items": kept, **counts}
    embed = {"responses": responses, "run": name}
    data = json.dumps(embed, ensure_ascii=False, default=str).replace("</", "<\\/")
    css = (STATIC / "app.css").read_text()
    scripts = "\n".join(
        (STATIC / f).read_text().replace("</script", "<\\/script") for f in ("chart.js", "app.js")
    )
    page = (STATIC / "index.html").read_text()
    page = page.replace(
        '<link rel="stylesheet" href="static/app.css">', f"<style>\n{css}\n</style>"
    )
    page = page.replace(
        '<script src="static/chart.js"></script>\n<script src="static/app.js"></script>',
        f"<script>window.SIALOOP_EMBED = {data};\nif (!location.hash) location.hash = "
        f"{json.dumps('#/run/' + name)};</script>\n<script>\n{scripts}\n</script>",
    )
    page = page.replace("<title>sialoop</title>", f"<title>sialoop run {name}</title>")
    return page, counts
