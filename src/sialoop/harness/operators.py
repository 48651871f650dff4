"""Typed mutation operators: each rewrites module-level constants of a harness file.

A harness exposes its knobs as module-level assignments of literals (`SHORTLIST = 8`); an
operator names new values for some of them and `apply_operator` rewrites exactly those
assignments, leaving every other byte of the file as it was. Guaranteed: the result parses, and
only the named constants change; an operator naming a constant the harness lacks is refused.
"""

from __future__ import annotations

import ast
from typing import Any

from pydantic import BaseModel, ConfigDict


class OperatorError(ValueError):
    """An operator that does not fit the harness it was applied to."""


class Operator(BaseModel):
    """One typed edit: a family (what it changes) and the constants it sets."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    family: str  # examples | shortlist | scoring | format
    assignments: dict[str, Any]
    why: str

    @property
    def key(self) -> str:
        """A stable name for 'this edit', used to avoid proposing it twice."""
        return (
            self.family + ":" + ",".join(f"{k}={v!r}" for k, v in sorted(self.assignments.items()))
        )


def _constant_nodes(tree: ast.Module) -> dict[str, ast.Assign]:
    found = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id.isupper()
        ):
            try:
                ast.literal_eval(node.value)
            except ValueError:
                continue
            found[node.targets[0].id] = node
    return found


def read_constants(source: str) -> dict[str, Any]:
    """The harness's knobs: module-level UPPER_CASE names bound to literals."""
    return {
        name: ast.literal_eval(node.value)
        for name, node in _constant_nodes(ast.parse(source)).items()
    }


def apply_operator(source: str, operator: Operator) -> str:
    """`source` with the operator's constants rewritten in place."""
    nodes = _constant_nodes(ast.parse(source))
    missing = sorted(set(operator.assignments) - set(nodes))
    if missing:
        raise OperatorError(f"harness has no constant {', '.join(missing)} to set")
    lines = source.splitlines(keepends=True)
    # Rewrite bottom-up so earlier line numbers stay valid.
    for name in sorted(operator.assignments, key=lambda n: -nodes[n].lineno):
        node = nodes[name]
        start, end = node.lineno - 1, (node.end_lineno or node.lineno) - 1
        tail = lines[end][node.end_col_offset :]
        lines[start : end + 1] = [f"{name} = {operator.assignments[name]!r}{tail}"]
    result = "".join(lines)
    ast.parse(result)
    return result
