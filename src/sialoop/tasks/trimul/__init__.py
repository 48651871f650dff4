"""TriMul: a kernel task scored by its measured speedup over the reference (see task.py)."""

from sialoop.tasks.trimul.task import ProgramFailed, TriMulTask

__all__ = ["ProgramFailed", "TriMulTask"]
