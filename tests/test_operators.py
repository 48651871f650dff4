"""Operators rewrite exactly the named constants; the offline Meta-Agent follows the focus."""

import ast

import pytest

from sialoop.agents.meta import OfflineMetaAgent
from sialoop.harness.operators import Operator, OperatorError, apply_operator, read_constants
from sialoop.tasks.templates import template_source
from sialoop.records import Decision, Lever

SOURCE = template_source("sialoop.tasks.lawbench", "fewshot.py")


def test_apply_rewrites_only_the_named_constants():
    op = Operator(
        family="shortlist", assignments={"SHORTLIST": 16, "SHORTLIST_SOURCE": "classifier"}, why="t"
    )
    out = apply_operator(SOURCE, op)
    before, after = read_constants(SOURCE), read_constants(out)
    assert after["SHORTLIST"] == 16 and after["SHORTLIST_SOURCE"] == "classifier"
    assert {k: v for k, v in after.items() if k not in op.assignments} == {
        k: v for k, v in before.items() if k not in op.assignments
    }
    changed = [a for a, b in zip(SOURCE.splitlines(), out.splitlines(), strict=True) if a != b]
    assert len(changed) == 2
    ast.parse(out)


def test_unknown_constant_is_refused():
    with pytest.raises(OperatorError, match="NOPE"):
        apply_operator(SOURCE, Operator(family="format", assignments={"NOPE": 1}, why="t"))


def _decision(focus: str) -> Decision:
    return Decision(
        run_id="r", generation=1, lever=Lever.harness, rationale="t", settings={"focus": focus}
    )


def test_meta_agent_follows_focus_and_never_repeats():
    agent = OfflineMetaAgent()
    first = agent.propose(SOURCE, _decision("shortlist"), set())
    assert first is not None and first.family == "shortlist"
    second = agent.propose(SOURCE, _decision("shortlist"), {first.key})
    assert second is not None and second.key != first.key
    tried: set[str] = set()
    while (op := agent.propose(SOURCE, _decision("examples"), tried)) is not None:
        assert op.key not in tried
        tried.add(op.key)
        ast.parse(agent.write(SOURCE, op))
    assert {k.split(":")[0] for k in tried} == {"examples", "shortlist", "scoring", "format"}


def test_meta_agent_rotates_after_repeated_tries_of_the_focus():
    agent = OfflineMetaAgent()
    tried = {"scoring:PRIOR_WEIGHT=1.0", "scoring:PRIOR_WEIGHT=3.0", "examples:x", "format:y"}
    op = agent.propose(SOURCE, _decision("scoring"), tried)
    assert op is not None and op.family == "shortlist"  # the untried family comes first
    op = agent.propose(SOURCE, _decision("scoring"), {"scoring:PRIOR_WEIGHT=1.0"})
    assert op is not None and op.family == "scoring"  # one try: the focus still leads


def _prior_decision(gap: float) -> Decision:
    settings = {"focus": "scoring", "hint": "prior_up", "prior_gap": gap}
    return Decision(run_id="r", generation=1, lever=Lever.harness, rationale="t", settings=settings)


def test_an_unused_prior_raises_its_weight_a_rung_or_two():
    agent = OfflineMetaAgent()
    assert read_constants(SOURCE)["PRIOR_WEIGHT"] == 0.0
    big = agent.propose(SOURCE, _prior_decision(0.5), set())
    assert big is not None and big.assignments == {"PRIOR_WEIGHT": 3.0}  # skips a rung
    small = agent.propose(SOURCE, _prior_decision(0.1), set())
    assert small is not None and small.assignments == {"PRIOR_WEIGHT": 1.0}
    heavier = apply_operator(SOURCE, big)
    nxt = agent.propose(heavier, _prior_decision(0.1), set())
    assert nxt is not None and nxt.assignments == {"PRIOR_WEIGHT": 10.0}
    # Without the hint one step up, then the other normalisation, then one step down.
    plain = [agent.propose(heavier, _decision("scoring"), tried) for tried in (set(),)]
    assert plain[0] is not None and plain[0].assignments == {"PRIOR_WEIGHT": 10.0}
    second = agent.propose(heavier, _decision("scoring"), {"scoring:PRIOR_WEIGHT=10.0"})
    assert second is not None and second.assignments == {"NORMALIZE": "mean"}
