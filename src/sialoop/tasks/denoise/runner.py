"""The trusted wrapper that runs a candidate denoising program inside the sandbox worker.

`DenoiseTask.score` runs this file as the harness of a `Sandbox` (no policy endpoint, no
network), one worker per program. Each `solve` call is one run: `{"program": path, "input":
name, "threads": n}`. The program (loaded once, on the first call) and the input are under the
worker's read-only `public/`: the input an `.npy` file of float64 counts, cells x genes, written
by the parent (only the half the program may see: the test half never enters a worker). The
wrapper loads a private copy, calls `denoise(counts)` once with BLAS and OpenMP limited to
`threads`, and saves the result as float64 `out.npy` in its scratch dir, where the parent reads
and scores it.

It answers `{"seconds", "io_s", "import_s", "shape"}`: the call's seconds, the seconds spent
loading the input and saving the output, and, on the first call, the program's import.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

_CLOCK = time.perf_counter
_PROGRAM: list[ModuleType] = []
_OUT = "out.npy"


def _program(name: str) -> tuple[ModuleType, float]:
    if _PROGRAM:
        return _PROGRAM[0], 0.0
    start = _CLOCK()
    path = Path("public") / name
    spec = importlib.util.spec_from_file_location("denoise_program", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "denoise", None)):
        raise TypeError("the program defines no denoise(counts)")
    _PROGRAM.append(module)
    return module, _CLOCK() - start


def solve(instance: dict[str, Any], llm: Any) -> dict[str, Any]:
    threads = int(instance.get("threads") or 1)
    program, import_s = _program(str(instance["program"]))
    start = _CLOCK()
    counts = np.array(np.load(Path("public") / str(instance["input"]), allow_pickle=False))
    loaded = _CLOCK()
    with threadpool_limits(limits=threads):
        out = program.denoise(counts)
    ran = _CLOCK()
    del counts
    if hasattr(out, "toarray"):  # a scipy.sparse result
        out = out.toarray()
    out = np.asarray(out, dtype=np.float64)
    np.save(Path(os.getcwd()) / _OUT, out, allow_pickle=False)
    return {
        "seconds": ran - loaded, "io_s": (loaded - start) + (_CLOCK() - ran),
        "import_s": import_s, "shape": list(out.shape), "threads": threads,
    }  # fmt: skip
