"""The toy colours task (see task.py)."""

from sialoop.tasks.toy.task import ToyTask

__all__ = ["ToyTask"]
