"""`apply_assignments` rewrites exactly the named constants and leaves every other byte."""

import ast

import pytest

from sialoop.harness.operators import OperatorError, apply_assignments, read_constants
from sialoop.tasks.templates import template_source

SOURCE = template_source("sialoop.tasks.lawbench", "fewshot.py")


def test_apply_rewrites_only_the_named_constants():
    assignments = {"SHORTLIST": 16, "SHORTLIST_SOURCE": "classifier"}
    out = apply_assignments(SOURCE, assignments)
    before, after = read_constants(SOURCE), read_constants(out)
    assert after["SHORTLIST"] == 16 and after["SHORTLIST_SOURCE"] == "classifier"
    assert {k: v for k, v in after.items() if k not in assignments} == {
        k: v for k, v in before.items() if k not in assignments
    }
    changed = [a for a, b in zip(SOURCE.splitlines(), out.splitlines(), strict=True) if a != b]
    assert changed == [
        "SHORTLIST = 8",
        'SHORTLIST_SOURCE = "neighbours"  # "neighbours" (TF-IDF'
        ' nearest train cases) or "classifier"',
    ]
    assert "SHORTLIST_SOURCE = 'classifier'  # \"neighbours\"" in out  # the comment stays
    ast.parse(out)


def test_unknown_constant_is_refused():
    with pytest.raises(OperatorError, match="NOPE"):
        apply_assignments(SOURCE, {"NOPE": 1})


def test_a_value_that_is_not_a_literal_is_refused():
    with pytest.raises(OperatorError, match="literal"):
        apply_assignments(SOURCE, {"SHORTLIST": object()})


def test_non_ascii_text_multi_line_values_and_shared_lines_keep_their_bytes():
    source = (
        'INSTRUCTION = "根据案情描述。"  # 说明\n'
        "A = 1; B = 2\n"
        "LADDER = [\n    1,\n    2,\n]\n"
        'LABEL = "盗窃"\n'
        "def solve(instance, llm):\n    return {}\n"
    )
    out = apply_assignments(
        source, {"LABEL": "诈骗", "B": 3, "LADDER": [1, 2, 4], "INSTRUCTION": "判断。"}
    )
    assert out == (
        "INSTRUCTION = '判断。'  # 说明\n"
        "A = 1; B = 3\n"
        "LADDER = [1, 2, 4]\n"
        "LABEL = '诈骗'\n"
        "def solve(instance, llm):\n    return {}\n"
    )
    assert read_constants(out) == {
        "INSTRUCTION": "判断。",
        "A": 1,
        "B": 3,
        "LADDER": [1, 2, 4],
        "LABEL": "诈骗",
    }
