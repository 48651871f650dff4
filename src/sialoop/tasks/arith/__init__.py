"""The arithmetic task: free-form numeric answers (see task.py)."""

from sialoop.tasks.arith.task import ArithTask, parse_number

__all__ = ["ArithTask", "parse_number"]
