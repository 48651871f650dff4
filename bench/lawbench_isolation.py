"""LawBench test under each isolation mode: the same harness, the same 913 cases, the answers
compared case by case.

    .venv/bin/python bench/lawbench_isolation.py                    # v3 of the reference run
    .venv/bin/python bench/lawbench_isolation.py --mode namespaces --harness runs/R/harness/v3.py

Scores the harness (default: v3 of the both-levers reference run, a local run folder: pass
`--harness` elsewhere; its per-case test scores
under the guard are `test_per_case["both"]` in bench/results/lawbench.json) on every test case
through real `Sandbox` workers (two, as a run) in `--mode`, against the embedded model served
on loopback, then compares the per-case scores with the reference's. Results stream to
bench/results/lawbench_isolation.json (resumable: cases already scored in that mode are kept).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from sialoop.config import RunConfig
from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.policy.compute import run_compute
from sialoop.policy.dtype import resolve_dtype
from sialoop.policy.hf import HFBackend
from sialoop.policy.model_files import embedded_model_dir
from sialoop.policy.recorder import MemoryRecorder
from sialoop.policy.server import PolicyServer
from sialoop.tasks import task_for

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "lawbench_isolation.json"
REFERENCE = HERE / "results" / "lawbench.json"
DEFAULT_HARNESS = HERE.parent / "runs" / "20261201-231401-bench-both" / "harness" / "v3.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="namespaces", choices=["namespaces", "guard"])
    p.add_argument("--harness", type=Path, default=DEFAULT_HARNESS)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    task = task_for(RunConfig(task="lawbench"))
    items = task.instances("test")
    results: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() else {}
    done: dict[str, float] = results.setdefault(args.mode, {}).setdefault("per_case", {})
    todo = [i for i in items if i.id not in done]
    lock = threading.Lock()
    backend = run_compute(HFBackend, embedded_model_dir(), dtype=resolve_dtype("auto"))
    started = time.perf_counter()
    scratch = Path("/tmp/sialoop-lawbench-isolation")
    public = scratch / "public"
    if not public.exists():
        task.write_public(public)
    limits = SandboxLimits(timeout_s=120.0, memory_mb=4096, startup_timeout_s=120.0)

    def work(chunk: list, k: int) -> None:
        with Sandbox(args.harness, policy_url=server.url, adapter="base", limits=limits,
                     public_dir=public, scratch_root=scratch / f"w{k}",
                     isolation=args.mode) as box:  # fmt: skip
            for n, item in enumerate(chunk):
                result = box.solve(item.inputs, f"iso-{k}-{n}")
                value = 0.0
                if result.error is None:
                    value = task.score(item, result.output).value  # the evaluator's side
                with lock:
                    done[item.id] = value
                    if len(done) % 50 == 0 or len(done) == len(items):
                        OUT.write_text(json.dumps(results, indent=1))
                        print(f"{args.mode}: {len(done)}/{len(items)} scored, "
                              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip

    chunks = [todo[k :: args.workers] for k in range(args.workers)]
    with (
        PolicyServer(backend, MemoryRecorder()) as server,
        ThreadPoolExecutor(args.workers) as pool,
    ):
        list(pool.map(work, chunks, range(args.workers)))
    reference = json.loads(REFERENCE.read_text())["test_per_case"]["both"]
    ids = sorted(set(reference) & set(done))
    b = sum(done[i] == 1 and reference[i] == 0 for i in ids)
    c = sum(done[i] == 0 and reference[i] == 1 for i in ids)
    results[args.mode]["comparison"] = {
        "harness": str(args.harness), "n": len(ids),
        "correct": int(sum(done[i] for i in ids)), "reference_correct":
            int(sum(reference[i] for i in ids)),
        "only_this_mode_right": b, "only_reference_right": c,
        "reference": "test_per_case['both'] in bench/results/lawbench.json (guard isolation)",
    }  # fmt: skip
    OUT.write_text(json.dumps(results, indent=1))
    print(json.dumps(results[args.mode]["comparison"], indent=1))


if __name__ == "__main__":
    main()
