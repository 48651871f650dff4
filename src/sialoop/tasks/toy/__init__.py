"""The toy colours task (see task.py)."""

from sialoop.tasks.toy.task import COLOURS, ToyTask

__all__ = ["COLOURS", "ToyTask"]
