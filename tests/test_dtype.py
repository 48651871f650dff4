"""`policy.dtype = "auto"` picks bfloat16 only where the CPU has a native bf16 dot product."""

from pathlib import Path

import pytest
import torch

from sialoop.config import RunConfig
from sialoop.policy.dtype import native_bf16, resolve_dtype

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA always means bf16")


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / f"cpuinfo-{abs(hash(flags))}"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


def test_native_bf16_reads_the_cpu_flags(tmp_path: Path):
    assert native_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert native_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16"))
    assert not native_bf16(_cpuinfo(tmp_path, "avx512f avx512bw"))  # AVX-512 without BF16
    assert not native_bf16(_cpuinfo(tmp_path, ""))


def test_explicit_dtypes_are_kept_and_auto_is_the_default():
    assert resolve_dtype("float32") == "float32"
    assert resolve_dtype("bfloat16") == "bfloat16"
    assert RunConfig().policy.dtype == "auto"
    expected = "bfloat16" if native_bf16() else "float32"
    assert resolve_dtype("auto") == expected
