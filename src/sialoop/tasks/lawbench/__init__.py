"""LawBench charge prediction on SIA's split (see task.py)."""

from sialoop.tasks.lawbench.task import LawBenchTask, stratified_split

__all__ = ["LawBenchTask", "stratified_split"]
