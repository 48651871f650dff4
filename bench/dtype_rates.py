"""GEMM and prefill rates of the policy in bfloat16 and float32 on this machine, side by side.

    .venv/bin/python bench/dtype_rates.py

For each dtype: a 2048^3 GEMM, a GEMM of the 270M model's own shape (256 tokens x 640 hidden x
2048), and a 256-token prefill of the embedded Gemma 3 270M decoder (non-embedding FLOPs
2 x 100.3M per token), as GFLOP/s, with the CPU's bf16 flags. `auto` picks bfloat16 only where
`sialoop.policy.dtype.native_bf16` holds. JSON: bench/results/dtype_rates.json, a row per CPU.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sialoop.policy.dtype import native_bf16
from sialoop.policy.model_files import embedded_model_dir

RESULTS = Path(__file__).resolve().parent / "results" / "dtype_rates.json"
NON_EMBEDDING = 100_326_016  # bench/item_profile.py counts the same
TOKENS = 256


def seconds(fn, reps: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def rates(dtype: torch.dtype) -> dict[str, float]:
    big = torch.randn(2048, 2048, dtype=dtype)
    x, w = torch.randn(TOKENS, 640, dtype=dtype), torch.randn(2048, 640, dtype=dtype)
    lm = AutoModelForCausalLM.from_pretrained(str(embedded_model_dir()), dtype=dtype).eval()
    ids = torch.randint(10, 20_000, (1, TOKENS))
    with torch.inference_mode():
        square = seconds(lambda: big @ big, 10)
        shaped = seconds(lambda: x @ w.T, 200)
        prefill = seconds(lambda: lm.get_decoder()(input_ids=ids, use_cache=True), 7)
    return {
        "gemm_2048_gflops": 2 * 2048**3 / square / 1e9,
        "gemm_256x640x2048_gflops": 2 * TOKENS * 640 * 2048 / shaped / 1e9,
        "prefill_256_ms": prefill * 1000,
        "prefill_256_gflops": 2 * NON_EMBEDDING * TOKENS / prefill / 1e9,
    }


if __name__ == "__main__":
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    model = next(
        (ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
         if ln.startswith("model name")), platform.processor(),
    )  # fmt: skip
    row = {
        "cpu": model,
        "cores": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "native_bf16": native_bf16(),
        "torch": torch.__version__,
        "bfloat16": rates(torch.bfloat16),
        "float32": rates(torch.float32),
    }
    b, f = row["bfloat16"], row["float32"]
    row["bf16_over_fp32"] = {k: b[k] / f[k] for k in b if k.endswith("gflops")}
    row["bf16_over_fp32"]["prefill_speedup"] = f["prefill_256_ms"] / b["prefill_256_ms"]
    print(json.dumps(row, indent=2))
    key = f"{model} avx512_bf16={row['avx512_bf16']} amx={row['amx_bf16']}"
    rows = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    rows[key] = row
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
