"""Which dtype the policy computes in: bfloat16 only where the hardware does it natively.

On a CPU without AVX512-BF16 or AMX, torch emulates bfloat16 matmuls, and a 270M prefill runs
about 4-5x slower than in float32 (measured on a 2-core AMD EPYC without AVX-512: 4.0 s vs
0.9 s for 377 tokens). `auto` therefore picks bfloat16 on CUDA or on a CPU that lists
`avx512_bf16` or `amx_bf16`, and float32 everywhere else.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Literal

Dtype = Literal["bfloat16", "float32"]
DtypeChoice = Literal["auto", "bfloat16", "float32"]
_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True on CUDA, or on a CPU whose flags include a native bfloat16 dot product."""
    import torch

    if torch.cuda.is_available():
        return True
    try:
        flags = cpuinfo.read_text()
    except OSError:  # not Linux: torch's own report is the best left
        return "AVX512" in torch.backends.cpu.get_cpu_capability()
    return any(flag in flags.split() for flag in _BF16_FLAGS)


def resolve_dtype(choice: DtypeChoice) -> Dtype:
    """The dtype a config's `policy.dtype` means on this machine."""
    if choice == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return choice
