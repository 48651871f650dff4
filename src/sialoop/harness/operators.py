"""Rewrite module-level constants of a harness file in place.

A harness exposes its knobs as module-level assignments of literals (`SHORTLIST = 8`);
`apply_assignments` rewrites exactly the named assignments to `NAME = repr(value)`, leaving
every other byte of the file as it was (a comment after the value stays). Guaranteed: the
result parses, and only the named constants change; naming a constant the harness lacks, or a
value whose `repr` is not a literal, is refused. Not checked here: that a value lies in the
knob's declared domain (`Declarations.check` does that).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any

from sialoop.harness.knobs import constant_nodes


class OperatorError(ValueError):
    """An edit that does not fit the harness it was applied to."""


def _upper_constants(tree: ast.Module) -> dict[str, ast.Assign]:
    return {name: node for name, node in constant_nodes(tree).items() if name.isupper()}


def read_constants(source: str) -> dict[str, Any]:
    """The harness's module-level UPPER_CASE names bound to literals, with their values."""
    return {
        name: ast.literal_eval(node.value)
        for name, node in _upper_constants(ast.parse(source)).items()
    }


def _literal_text(name: str, value: Any) -> str:
    text = repr(value)
    try:
        same = ast.literal_eval(text) == value
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        same = False
    if not same:
        raise OperatorError(f"{name} = {text} is not a literal that reads back as itself")
    return text


def apply_assignments(source: str, assignments: Mapping[str, Any]) -> str:
    """`source` with each named constant's assignment rewritten to its new value."""
    nodes = _upper_constants(ast.parse(source))
    missing = sorted(set(assignments) - set(nodes))
    if missing:
        raise OperatorError(f"harness has no constant {', '.join(missing)} to set")
    # Offsets in `ast` are UTF-8 byte offsets: edit bytes, last statement first, so the
    # offsets of the statements before each edit stay valid.
    lines = source.encode("utf-8").splitlines(keepends=True)
    order = sorted(assignments, key=lambda n: (nodes[n].lineno, nodes[n].col_offset), reverse=True)
    for name in order:
        node = nodes[name]
        assert node.end_lineno is not None and node.end_col_offset is not None
        start, end = node.lineno - 1, node.end_lineno - 1
        head = lines[start][: node.col_offset]
        tail = lines[end][node.end_col_offset :]
        text = f"{name} = {_literal_text(name, assignments[name])}".encode()
        lines[start : end + 1] = [head + text + tail]
    result = b"".join(lines).decode("utf-8")
    ast.parse(result)
    return result
