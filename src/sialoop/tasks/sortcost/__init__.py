"""The sort-cost program task: fewest comparisons, measured in an isolated worker (see task.py)."""

from sialoop.tasks.sortcost.task import ProgramFailed, SortCostTask

__all__ = ["ProgramFailed", "SortCostTask"]
