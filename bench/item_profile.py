"""Where one LawBench item's seconds go, beside the compute bound of its forward passes.

    .venv/bin/python bench/item_profile.py                         # generation 0 and the v3 knobs
    .venv/bin/python bench/item_profile.py --harness runs/R/harness/v3.py --items 60

For each harness (the reference template as generation 0, and the best LawBench knobs: the
classifier shortlist with PRIOR_WEIGHT 30, as the loop's accepted v3), on the first `--items`
val items:
- in-process, the harness's `solve` against the backend directly (no sandbox, no HTTP): harness
  Python (retrieval, classifier), tokenisation, prompt (prefix) forward, option (suffix)
  forward, LM head, the rest of the backend's bookkeeping;
- through the real path, one sandbox worker against the real endpoint: the item's wall time;
  the difference to in-process is sandbox round-trip, HTTP and JSON, and waiting in the batcher;
- the same with the run's default of two workers, as items per second;
- in-process again on the same model with plain weights (`pack_weights=False`): what reordering
  the linears' weights once for oneDNN (`sialoop.policy.packed`) gains, as a ratio.
The compute bound is the non-embedding FLOPs of the tokens the backend ran, plus the LM head
(vocabulary x hidden x 2 per logit row), at the GEMM rate measured here in the policy's dtype.
JSON: bench/results/item_profile.json (machine, dtype and every figure).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from sialoop.config import RunConfig
from sialoop.harness.operators import apply_assignments
from sialoop.harness.sandbox import Sandbox, SandboxLimits
from sialoop.policy.batcher import ScoreRequest
from sialoop.policy.compute import run_compute
from sialoop.policy.dtype import native_bf16, resolve_dtype
from sialoop.policy.hf import HFBackend
from sialoop.policy.model_files import embedded_model_dir
from sialoop.policy.recorder import MemoryRecorder
from sialoop.policy.server import PolicyServer
from sialoop.tasks import task_for

OUT = Path(__file__).parent / "results" / "item_profile.json"
BEST_KNOBS = {"SHORTLIST_SOURCE": "classifier", "PRIOR_WEIGHT": 30.0}
CHEAP_KNOBS = {**BEST_KNOBS, "LM_MARGIN": 0.5}  # the default run's accepted cost move


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=40, help="val items per harness")
    p.add_argument("--harness", type=Path, action="append", help="harness files (default: both)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--skip-sandbox", action="store_true", help="in-process figures only")
    p.add_argument("--skip-unpacked", action="store_true",
                   help="no in-process row on plain (not oneDNN-packed) weights beside it")  # fmt: skip
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args()


# -- timing ---------------------------------------------------------------------------------
class Clock:
    """Seconds per named phase, nested phases subtracted from their parent."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        frame = [name, time.perf_counter(), 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            spent = time.perf_counter() - frame[1]
            self.total[name] += spent - frame[2]
            if self._stack:
                self._stack[-1][2] += spent


def instrument(backend: HFBackend, clock: Clock) -> None:
    """Wrap the backend's steps so the clock splits a scoring request."""
    for attr, name in [
        ("_encode", "tokenisation"),
        ("_prefix", "prompt forward"),
        ("_run_suffixes", "option forward"),
        ("_head", "LM head"),
    ]:
        fn = getattr(backend, attr)

        def wrapped(*a, _fn=fn, _name=name, **k):
            with clock.phase(_name):
                return _fn(*a, **k)

        setattr(backend, attr, wrapped)


class DirectLLM:
    """The openai client's `completions.create` for scoring, answered by the backend itself."""

    def __init__(self, backend: HFBackend, clock: Clock):
        self._backend, self._clock = backend, clock
        self.completions = self

    def create(self, *, prompt, extra_body=None, logprobs=0, **_: Any):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        start = (extra_body or {}).get("echo_logprobs_from")
        offsets = None if start is None else tuple([start] * len(prompts))
        request = ScoreRequest("base", tuple(prompts), logprobs or 0, offsets)
        with self._clock.phase("backend other"):
            scored = self._backend.score(request)
        choices = [
            SimpleNamespace(
                index=i,
                logprobs=SimpleNamespace(
                    token_logprobs=s.logprobs.token_logprobs,
                    text_offset=s.logprobs.text_offset,
                    tokens=s.logprobs.tokens,
                ),
            )
            for i, s in enumerate(scored)
        ]
        return SimpleNamespace(choices=choices)


def gemm_rate(dtype: torch.dtype, hidden: int, inner: int) -> float:
    """FLOP/s of a prompt-sized GEMM in `dtype` (the MLP's shape at 512 tokens)."""
    a, b = torch.randn(512, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        a @ b
        n += 1
    return 2 * 512 * hidden * inner * n / (time.perf_counter() - start)


def non_embedding_params(backend: HFBackend) -> tuple[int, int, int]:
    lm = backend._lm
    embed = lm.get_input_embeddings().weight
    total = sum(p.numel() for p in lm.parameters())
    return total - embed.numel(), embed.shape[0], embed.shape[1]


# -- the harness ----------------------------------------------------------------------------
def load_harness(source: str, knobs: dict[str, Any], public: Path, workdir: Path):
    """Import the harness with cwd at a folder holding `public/`, knobs applied (as the Meta-
    Agent writes them) before its module-level code runs."""
    source = apply_assignments(source, knobs) if knobs else source
    (workdir / "public").symlink_to(public)
    file = workdir / "harness.py"
    file.write_text(source, encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        spec = importlib.util.spec_from_file_location(f"profiled_{abs(hash(file))}", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "setup"):
            module.setup()
    finally:
        os.chdir(cwd)
    return module, file


def in_process(module, items, backend: HFBackend, clock: Clock, public_root: Path) -> dict:
    llm = DirectLLM(backend, clock)
    before = dict(backend.stats)
    cwd = os.getcwd()
    os.chdir(public_root)
    try:
        module.solve(items[0].inputs, llm)  # warm-up: lazy work, first-call allocations
        clock.total.clear()
        before = dict(backend.stats)
        start = time.perf_counter()
        for item in items:
            with clock.phase("harness Python"):
                module.solve(item.inputs, llm)
        wall = time.perf_counter() - start
    finally:
        os.chdir(cwd)
    stats = {k: backend.stats[k] - before[k] for k in before}
    n = len(items)
    return {
        "seconds_per_item": wall / n,
        "phases": {k: v / n for k, v in sorted(clock.total.items(), key=lambda kv: -kv[1])},
        "per_item": {k: v / n for k, v in stats.items()},
    }


def through_sandbox(file: Path, items, url: str, public: Path, workers: int, scratch: Path):
    limits = SandboxLimits(timeout_s=120.0, memory_mb=4096, startup_timeout_s=120.0)

    def run(chunk: list, k: int) -> list[float]:
        times = []
        with Sandbox(file, policy_url=url, adapter="base", limits=limits, public_dir=public,
                     scratch_root=scratch / f"w{k}") as box:  # fmt: skip
            box.solve(items[0].inputs, f"warm-{k}")
            for i, item in enumerate(chunk):
                start = time.perf_counter()
                result = box.solve(item.inputs, f"ep-{k}-{i}")
                if result.error is not None:
                    raise RuntimeError(result.error.message)
                times.append(time.perf_counter() - start)
        return times

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        chunks = [items[k::workers] for k in range(workers)]
        times = [t for ts in pool.map(run, chunks, range(workers)) for t in ts]
    # The wall includes each worker's start and warm-up item; throughput uses item times.
    return {"seconds_per_item": sum(times) / len(times), "wall": time.perf_counter() - start,
            "items_per_second": workers * len(times) / sum(times), "isolation": "auto"}  # fmt: skip


def main() -> None:
    args = parse_args()
    cfg = RunConfig(task="lawbench")
    task = task_for(cfg)
    items = task.instances("val")[: args.items]
    dtype = resolve_dtype(args.dtype)
    reference = ("generation0", task.reference_harness())
    harnesses = [((h.stem, h.read_text(encoding="utf-8")), {}) for h in args.harness or []] or [
        (reference, {}), (reference, BEST_KNOBS), (reference, CHEAP_KNOBS)]  # fmt: skip
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    # All torch work on the endpoint's compute thread, as in a run (see sialoop.policy.compute).
    start = time.perf_counter()
    backend = run_compute(HFBackend, embedded_model_dir(), dtype=dtype)
    load_s = time.perf_counter() - start
    params, vocab, hidden = non_embedding_params(backend)
    inner = backend._lm.config.intermediate_size
    rate = run_compute(gemm_rate, torch_dtype, hidden, inner)
    clock = Clock()
    instrument(backend, clock)
    # The same model on plain weights, to show what packing them (policy/packed.py) gains.
    unpacked, plain_clock = None, Clock()
    if not args.skip_unpacked:
        unpacked = run_compute(HFBackend, embedded_model_dir(), dtype=dtype, pack_weights=False)
        instrument(unpacked, plain_clock)
    results: dict[str, Any] = {
        "computed_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "native_bf16": native_bf16(), "torch_threads": torch.get_num_threads()},
        "dtype": dtype, "items": len(items), "gemm_flops": rate,
        "non_embedding_params": params, "vocab": vocab, "hidden": hidden, "harnesses": {},
        "model_load_s": load_s,
    }  # fmt: skip
    start = time.perf_counter()
    with PolicyServer(backend, MemoryRecorder()):
        results["endpoint_start_s"] = time.perf_counter() - start
    print(f"model load {load_s:.1f} s, endpoint start {results['endpoint_start_s']:.2f} s")
    print(f"{results['machine']}  dtype {dtype}  GEMM {rate / 1e9:.0f} GFLOP/s")
    with tempfile.TemporaryDirectory() as tmp:
        public = Path(tmp) / "public"
        task.write_public(public)
        for n, ((stem, source), knobs) in enumerate(harnesses):
            name = stem + (" " + ",".join(f"{k}={v}" for k, v in knobs.items()) if knobs else "")
            work = Path(tmp) / f"h{n}"
            work.mkdir()
            start = time.perf_counter()
            module, file = run_compute(load_harness, source, knobs, public, work)
            import_s = time.perf_counter() - start
            row = run_compute(in_process, module, items, backend, clock, work)
            per = row["per_item"]
            head = 2 * vocab * hidden * per["head_rows"]
            tokens = per["prefix_tokens"] + per["suffix_tokens"]
            body = 2 * params * tokens
            row["bound_seconds"] = (body + head) / rate
            row["import_and_setup_s"] = import_s
            if unpacked is not None:
                row["unpacked"] = run_compute(
                    in_process, module, items, unpacked, plain_clock, work
                )
            if not args.skip_sandbox:
                recorder = MemoryRecorder()
                with PolicyServer(backend, recorder) as server:
                    for workers in (1, 2):
                        row[f"sandbox_{workers}"] = through_sandbox(
                            file, items, server.url, public, workers, Path(tmp) / f"s{n}{workers}"
                        )
            results["harnesses"][name] = row
            print_row(name, row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


def print_row(name: str, row: dict) -> None:
    print(f"\n== {name}  (import + setup {row['import_and_setup_s']:.1f} s)")
    print(f"  in-process  {row['seconds_per_item']:.3f} s/item")
    for phase, s in row["phases"].items():
        print(f"    {phase:<16}{s:8.3f} s  {100 * s / row['seconds_per_item']:5.1f} %")
    print(f"  tokens/item: prefix {row['per_item']['prefix_tokens']:.0f}, "
          f"suffix rows {row['per_item']['suffix_rows']:.1f}, head rows "
          f"{row['per_item']['head_rows']:.1f}")  # fmt: skip
    print(f"  compute bound {row['bound_seconds']:.3f} s/item  "
          f"(in-process is {row['seconds_per_item'] / row['bound_seconds']:.1f}x)")  # fmt: skip
    if (plain := row.get("unpacked")) is not None:
        print(f"  on plain weights {plain['seconds_per_item']:.3f} s/item "
              f"({plain['seconds_per_item'] / row['seconds_per_item']:.2f}x the packed): "
              + ", ".join(f"{k} {v:.3f}" for k, v in plain["phases"].items()))  # fmt: skip
    for workers in (1, 2):
        if (s := row.get(f"sandbox_{workers}")) is not None:
            print(f"  sandbox + endpoint, {workers} worker(s): {s['seconds_per_item']:.3f} s/item,"
                  f" {s['items_per_second']:.2f} items/s")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
