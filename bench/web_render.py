"""The dashboard on a large run: API times and the browser's time to the run page's full render
on a run of 10,000 trajectories, plus screenshots of each page of a real run.

    python bench/web_render.py [--run runs/lawbench-web] [--trajectories 10000]
    python bench/web_render.py --run runs/denoise-web --trajectories 0   # screenshots only

The large run is a copy of RUN whose stored trajectories (with their LLM calls) are repeated
under new ids until it holds `--trajectories` of them: the same records a real run stores, so
the JSON fields and the calls are as big as a real run's. Render time: from navigation start
(`performance.timeOrigin`) to the moment the page says it rendered (`body[data-rendered]`,
`performance.now()` then), median of 5 fresh navigations in headless Debian Chromium.
JSON: bench/results/web_render.json, a row per source run; screenshots: bench/results/web/*.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import chromium, rendered, serve  # noqa: E402
from sialoop.records import new_id  # noqa: E402
from sialoop.store import Store  # noqa: E402

RESULTS = ROOT / "bench" / "results"


def grow(source: Path, dest: Path, target: int) -> int:
    """Copies `source` to `dest` and repeats its trajectories (and calls) up to `target`."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("run.lock", "adapters"))
    store = Store.open(dest)
    real = store.trajectories()
    calls = {t.trajectory_id: store.llm_calls(t.trajectory_id) for t in real}
    n = len(real)
    with store.transaction() as db:
        k = 0
        while n < target:
            t = real[k % len(real)]
            tid = new_id("ep")
            db.execute(
                "INSERT INTO trajectories VALUES (?, ?, ?, ?, ?, ?)",
                (tid, t.version_id, t.split, t.instance_id, t.sample,
                 t.model_copy(update={"trajectory_id": tid}).model_dump_json()),
            )  # fmt: skip
            for c in calls[t.trajectory_id]:
                copy = c.model_copy(update={"call_id": new_id("call"), "episode_id": tid})
                db.execute(
                    "INSERT INTO llm_calls VALUES (?, ?, ?)",
                    (copy.call_id, tid, copy.model_dump_json()),
                )
            n, k = n + 1, k + 1
    store.close()
    return len(real)


def timed(client: httpx.Client, path: str, params: dict | None = None, reps: int = 5) -> float:
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        client.get(path, params=params).raise_for_status()
        seconds.append(time.perf_counter() - started)
    return round(statistics.median(seconds) * 1000, 1)


def render_ms(driver, url: str, page: str, reps: int = 5) -> float:
    out = []
    for _ in range(reps):
        driver.get("about:blank")
        driver.get(url)
        rendered(driver, page, timeout=300)
        out.append(float(driver.execute_script("return document.body.dataset.renderedMs")))
    return statistics.median(out)


def screenshots(driver, url: str, run: str, out: Path) -> list[str]:
    store = Store.open(Path(args.run))
    versions = store.versions()
    harness = next((v for v in versions if v.generation and "diff" in v.detail), None)
    weights = next((v for v in versions if "training" in v.detail), None)
    # a trajectory with LLM calls; a program that calls no model: the best version's on val
    trajectories = store.trajectories()
    best = store.incumbent()
    shown = next((t for t in trajectories if store.llm_calls(t.trajectory_id)), None) or next(
        t for t in trajectories if t.split == "val" and best and t.version_id == best.version_id
    )
    pages = [("runs", "#/", "runs"), ("run", f"#/run/{run}", "run"),
             ("trajectories", f"#/run/{run}/traj?split=val&correct=false", "trajectories"),
             ("trajectory", f"#/run/{run}/t/{shown.trajectory_id}", "trajectory")]  # fmt: skip
    if harness:
        pages.append(("generation-harness", f"#/run/{run}/gen/{harness.generation}", "generation"))
    if weights:
        pages.append(("generation-weights", f"#/run/{run}/gen/{weights.generation}", "generation"))
    names = []
    for name, hash_, page in pages:
        driver.get("about:blank")
        driver.get(url + hash_)
        rendered(driver, page, timeout=300)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(max(900, height), 4000))
        path = out / f"{run}-{name}.png"
        driver.save_screenshot(str(path))
        driver.set_window_size(1400, 1000)
        names.append(str(path.relative_to(ROOT)))
    return names


def large_run_figures(source: Path, target: int) -> dict:
    """API and render times on a copy of `source` grown to `target` trajectories."""
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "runs" / "big"
        row: dict = {"real_trajectories": grow(source, big, target), "trajectories": target}
        with serve(big.parent) as url, chromium() as driver:
            client = httpx.Client(base_url=url, timeout=300)
            first = client.get("/api/runs/big/trajectories").json()["items"][0]["id"]
            row["api_ms"] = {
                "summary": timed(client, "/api/runs/big/summary"),
                "trajectories_first_page": timed(client, "/api/runs/big/trajectories"),
                "trajectories_last_page": timed(
                    client, "/api/runs/big/trajectories", {"offset": target - 50}
                ),
                "trajectories_wrong_val": timed(
                    client, "/api/runs/big/trajectories", {"split": "val", "correct": "false"}
                ),
                "trajectory_with_calls": timed(client, f"/api/runs/big/trajectories/{first}"),
            }
            row["render_ms"] = {
                "run": render_ms(driver, url + "#/run/big", "run"),
                "trajectories": render_ms(driver, url + "#/run/big/traj", "trajectories"),
            }
    return row


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/lawbench-web")
    parser.add_argument("--trajectories", type=int, default=10_000, help="0: screenshots only")
    args = parser.parse_args()
    source = Path(args.run).resolve()
    shots = RESULTS / "web"
    shots.mkdir(parents=True, exist_ok=True)
    row: dict = {"source_run": source.name, "cpu": platform.processor() or platform.machine()}
    if args.trajectories:
        row |= large_run_figures(source, args.trajectories)
    with serve(source.parent) as url, chromium() as driver:
        row["screenshots"] = screenshots(driver, url, source.name, shots)
    print(json.dumps(row, indent=2))
    out = RESULTS / "web_render.json"
    rows = json.loads(out.read_text()) if out.is_file() else {}
    if "source_run" in rows:  # the file's first layout: one row
        rows = {rows["source_run"]: rows}
    rows[source.name] = row
    out.write_text(json.dumps(rows, indent=2) + "\n")
