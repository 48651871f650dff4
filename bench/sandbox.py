"""Sandbox overhead per isolation mode, against running `solve` in-process.

One synthetic LawBench-like item: ~`--work-ms` of CPU (string scoring in pure Python) plus one
LLM call to an instant local endpoint (so the bridge's cost is in the figure, not a model's).
Per mode ("guard", "namespaces" where bubblewrap works) it measures:
- start-up, spawn to ready-to-solve, of a bare harness (no imports of its own), and of the same
  harness importing numpy + sklearn: the difference is the harness's own imports;
- per-item time of `Sandbox.solve` on a warm worker, against `solve` in-process with an openai
  client on the same endpoint; overhead = sandboxed - in-process, and its ratio to the item.

    .venv/bin/python bench/sandbox.py [--items 40 --starts 5 --work-ms 50]

Prints the modes side by side with the ratios and writes bench/results/sandbox.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai

from sialoop.harness import isolation as iso
from sialoop.harness.program import load_harness
from sialoop.harness.sandbox import Sandbox, SandboxLimits

OUT = Path(__file__).parent / "results" / "sandbox.json"
HARNESS = """
import time
{imports}

def solve(instance, llm):
    end = time.perf_counter() + instance["work_ms"] / 1000
    score = 0
    while time.perf_counter() < end:
        score += sum(ord(c) for c in instance["text"]) % 7
    text = llm.completions.create(model="policy", prompt=instance["text"], max_tokens=1)
    return {{"score": score, "text": text.choices[0].text}}
"""
IMPORTS = "import numpy, sklearn.linear_model, sklearn.feature_extraction.text"
LIMITS = SandboxLimits(timeout_s=60.0, startup_timeout_s=120.0, memory_mb=4096)


class _Policy(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.dumps({
            "id": "c", "object": "text_completion", "created": 0, "model": "policy",
            "choices": [{"index": 0, "text": "ok", "finish_reason": "stop", "logprobs": None}],
        }).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def _cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs"


def _items(n: int, work_ms: float) -> list[dict[str, Any]]:
    return [
        {"text": f"被告人张某{i}盗窃财物，价值人民币{i * 37}元。", "work_ms": work_ms}
        for i in range(n)
    ]


def _in_process(path: Path, url: str, items: list[dict[str, Any]]) -> list[float]:
    module = load_harness(path)
    llm = openai.OpenAI(base_url=url, api_key="sialoop")
    module.solve(items[0], llm)  # warm the client
    times = []
    for item in items:
        started = time.perf_counter()
        module.solve(item, llm)
        times.append(time.perf_counter() - started)
    return times


def _starts(path: Path, url: str, mode: str, n: int, scratch: Path) -> list[float]:
    times = []
    for _ in range(n):
        with Sandbox(path, policy_url=url, adapter="base", limits=LIMITS, scratch_root=scratch,
                     isolation=mode) as box:  # fmt: skip
            started = time.perf_counter()
            error = box.start()
            times.append(time.perf_counter() - started)
            assert error is None, error
    return times


def _sandboxed(path: Path, url: str, mode: str, items: list[dict[str, Any]], scratch: Path):
    with Sandbox(path, policy_url=url, adapter="base", limits=LIMITS, scratch_root=scratch,
                 isolation=mode) as box:  # fmt: skip
        box.solve(items[0], "ep-warm")
        times = []
        for i, item in enumerate(items):
            started = time.perf_counter()
            result = box.solve(item, f"ep-{i}")
            times.append(time.perf_counter() - started)
            assert result.error is None, result.error
    return times


def _ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=40)
    p.add_argument("--starts", type=int, default=5)
    p.add_argument("--work-ms", type=float, default=50.0)
    args = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Policy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    modes = ["guard"] + (["namespaces"] if iso.namespaces_available()[0] else [])
    items = _items(args.items, args.work_ms)
    with tempfile.TemporaryDirectory(prefix="sialoop-bench-") as tmp:
        root = Path(tmp)
        bare, heavy = root / "bare.py", root / "heavy.py"
        bare.write_text(HARNESS.format(imports=""))
        heavy.write_text(HARNESS.format(imports=IMPORTS))
        base = _ms(_in_process(bare, url, items))
        results: dict[str, Any] = {}
        for mode in modes:
            start_bare = _ms(_starts(bare, url, mode, args.starts, root / "s"))
            start_heavy = _ms(_starts(heavy, url, mode, args.starts, root / "s"))
            item = _ms(_sandboxed(bare, url, mode, items, root / "s"))
            results[mode] = {
                "start_bare_ms": start_bare,
                "start_with_imports_ms": start_heavy,
                "harness_imports_ms": round(start_heavy - start_bare, 2),
                "item_ms": item,
                "overhead_ms": round(item - base, 2),
                "overhead_ratio": round((item - base) / base, 4),
            }
    server.shutdown()
    rows = [
        ("start-up, bare harness (ms)", "start_bare_ms"),
        ("start-up, numpy+sklearn harness (ms)", "start_with_imports_ms"),
        ("  of which the harness's imports (ms)", "harness_imports_ms"),
        ("per item, median (ms)", "item_ms"),
        ("per-item overhead vs in-process (ms)", "overhead_ms"),
        ("overhead / item time", "overhead_ratio"),
    ]
    print(f"in-process solve, median: {base} ms per item ({args.work_ms:g} ms CPU + 1 LLM call)")
    print(f"{'':40s}" + "".join(f"{m:>14s}" for m in modes))
    for label, key in rows:
        print(f"{label:40s}" + "".join(f"{results[m][key]:>14}" for m in modes))
    if len(modes) == 2:
        g, n = results["guard"], results["namespaces"]
        print(f"namespaces / guard: start-up x{n['start_bare_ms'] / g['start_bare_ms']:.2f}, "
              f"per item x{n['item_ms'] / g['item_ms']:.3f}")  # fmt: skip
    report = {
        "cpu": _cpu(),
        "python": platform.python_version(),
        "bwrap": iso.bwrap_path(),
        "pids_cgroup": iso.pids_cgroup_available(),
        "items": args.items,
        "starts": args.starts,
        "work_ms": args.work_ms,
        "in_process_item_ms": base,
        "modes": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
