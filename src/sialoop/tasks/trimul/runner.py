"""The trusted wrapper that runs a candidate TriMul program inside the sandbox worker.

`TriMulTask.score` runs this file as the harness of a `Sandbox` (no policy endpoint), one per
program. Each `solve` call is one run: `{"program": path, "input": name, "device": "cpu" |
"cuda", "threads": n}`. The program (loaded once, on the first call) and the input are under the
worker's `public/` (read-only): the input a folder: `meta.json` (shapes, config) and one raw float32 file per
tensor, written by the parent. The wrapper copies them into fresh tensors (outside the clock),
calls `custom_kernel((input, mask, weights, config))` once, and writes the output as raw
float32 to `out.bin` in its scratch dir, where the parent reads and checks it.

It answers `{"kernel_s", "io_s", "import_s", "shape"}`: the kernel's seconds (CUDA events and a
synchronise on a GPU), the seconds spent copying inputs in and the output out, and, on the
first call, the seconds importing the program took (a compile at import shows there).

Guaranteed for a program that plays fair: `kernel_s` is the call of `custom_kernel` and
nothing else. Not guaranteed against a determined one: it runs in this process, so it can patch
the clock; the parent compares `kernel_s + io_s` with the wall time it measured itself, outside.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

_CLOCK = time.perf_counter
_PROGRAM: list[ModuleType] = []
_OUT = "out.bin"


def _program(name: str) -> tuple[ModuleType, float]:
    if _PROGRAM:
        return _PROGRAM[0], 0.0
    start = _CLOCK()
    path = Path("public") / name
    spec = importlib.util.spec_from_file_location("trimul_program", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    if not callable(getattr(module, "custom_kernel", None)):
        raise TypeError("the program defines no custom_kernel(data)")
    _PROGRAM.append(module)
    return module, _CLOCK() - start


def _load(folder: Path, device: str) -> tuple:
    meta = json.loads((folder / "meta.json").read_text())

    def tensor(name: str) -> torch.Tensor:
        shape = meta["shapes"][name]
        numel = 1
        for s in shape:
            numel *= s
        mapped = torch.from_file(str(folder / f"{name}.bin"), shared=False, size=numel)
        return mapped.view(shape).clone().to(device)  # a private copy: the file stays pristine

    weights = {name: tensor(name) for name in meta["weights"]}
    return tensor("input"), tensor("mask"), weights, dict(meta["config"])


def solve(instance: dict[str, Any], llm: Any) -> dict[str, Any]:
    threads = int(instance.get("threads") or 0)
    if threads:
        torch.set_num_threads(threads)
    device = str(instance.get("device", "cpu"))
    program, import_s = _program(str(instance["program"]))
    start = _CLOCK()
    data = _load(Path("public") / str(instance["input"]), device)
    loaded = _CLOCK()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = program.custom_kernel(data)
        end.record()
        torch.cuda.synchronize()
        kernel_s = begin.elapsed_time(end) / 1000
    else:
        t0 = _CLOCK()
        out = program.custom_kernel(data)
        kernel_s = _CLOCK() - t0
    ran = _CLOCK()
    del data
    if isinstance(out, tuple | list) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"custom_kernel returned a {type(out).__name__}, not a tensor")
    shape = list(out.shape)
    flat = out.detach().to("cpu", torch.float32).contiguous().view(-1)
    target = Path(os.getcwd()) / _OUT
    with target.open("wb") as f:
        f.write(memoryview(flat.numpy()).cast("B"))
    io_s = (loaded - start) + (_CLOCK() - ran)
    return {
        "kernel_s": kernel_s, "io_s": io_s, "import_s": import_s, "shape": shape,
        "threads": torch.get_num_threads(),  # after the kernel: its THREADS knob may set them
    }  # fmt: skip
