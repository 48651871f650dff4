"""Knob and signal declarations: parsed from the source, checked, refused in one line."""

import ast

import pytest

from sialoop.harness.knobs import (
    Declarations,
    Knob,
    KnobError,
    constant_nodes,
    read_declarations,
)
from sialoop.tasks.templates import template_source

LAWBENCH = template_source("sialoop.tasks.lawbench", "fewshot.py")


def test_the_lawbench_template_declares_its_knobs_and_signals():
    decl = read_declarations(LAWBENCH)
    assert decl.families == ["examples", "shortlist", "scoring", "format", "cost"]
    assert decl.values["LM_MARGIN"] == 1.0 and decl.knobs["LM_MARGIN"].kind == "ordered"
    assert decl.family_knobs("shortlist")[0].name == "SHORTLIST_SOURCE"
    assert decl.values["PRIOR_WEIGHT"] == 0.0 and decl.values["SHORTLIST_SOURCE"] == "neighbours"
    assert decl.knobs["PRIOR_WEIGHT"].kind == "ordered"
    assert decl.knobs["EXAMPLE_CHARS"].step == 80
    prior = decl.signals["prior_ranked"]
    assert prior.kind == "alternative" and prior.raises == "PRIOR_WEIGHT"
    assert prior.bound_family == "shortlist" and decl.signals["ranked"].family == "shortlist"
    assert decl.answer_key == "label"


def test_the_toy_template_declares_its_knobs_and_a_zero_shot_one_none():
    toy = read_declarations(template_source("sialoop.tasks.toy", "option_scoring.py"))
    assert toy.values == {"N_EXAMPLES": 4, "NORMALIZE": "sum"}
    assert toy.signals["ranked"].kind == "ranking"
    none = read_declarations(template_source("sialoop.tasks.lawbench", "zeroshot.py"))
    assert none == Declarations(answer_key=none.answer_key)


def _harness(knobs: str, constants: str = "N = 4\nMODE = 'a'\nRATE = 0.5\n", extra: str = ""):
    return f"{constants}KNOBS = {knobs}\n{extra}\ndef solve(instance, llm):\n    return {{}}\n"


@pytest.mark.parametrize(
    ("knobs", "extra", "match"),
    [
        ('{"N": {"family": "f", "int": [5, 8]}}', "", "N = 4 is outside its declared domain"),
        ('{"MODE": {"family": "f", "choices": ["b", "c"]}}', "", "outside its declared domain"),
        ('{"N": {"family": "f", "int": [0, 8], "step": 3}}', "", "multiple of step"),
        ('{"N": {"family": "f", "int": [1, 7], "step": 2}}', "", "outside"),  # 4 is off-grid
        ('{"MISSING": {"family": "f", "int": [0, 8]}}', "", "not an UPPER_CASE module constant"),
        ('{"rate": {"family": "f", "float": [0, 1]}}', "rate = 0.5", "UPPER_CASE"),
        ('{"CALLED": {"family": "f", "int": [0, 8]}}', "CALLED = int('3')", "bound to a literal"),
        ('{"N": {"family": "f", "int": [0, 8]}}', "N += 1", "not an UPPER_CASE module constant"),
        ('{"N": {"family": "f", "int": [8, 0]}}', "", "low < high"),
        ('{"N": {"family": "f", "int": [0.5, 8]}}', "", "integers"),
        ('{"N": {"family": "f", "int": [0, 8], "choices": [1]}}', "", "exactly one domain"),
        ('{"N": {"family": "f"}}', "", "exactly one domain"),
        ('{"N": {"int": [0, 8]}}', "", "needs a 'family'"),
        ('{"N": {"family": "f", "int": [0, 8], "stepp": 2}}', "", "unknown key 'stepp'"),
        ('{"N": {"family": "f", "int": [0, 8], "log": True}}', "", "low > 0"),
        ('{"N": {"family": "f", "int": [1, 8], "log": True, "step": 1}}', "", "exclude"),
        ('{"MODE": {"family": "f", "choices": []}}', "", "non-empty list"),
        ('{"MODE": {"family": "f", "choices": ["a", "a"]}}', "", "twice"),
        ('{"MODE": {"family": "f", "choices": ["a", "b"], "log": True}}', "", "int and float"),
        ('{"N": [0, 8]}', "", "must be a dict"),
        ("dict(N=1)", "", "KNOBS must be bound to a literal"),
    ],
)
def test_a_malformed_knob_is_a_one_line_error(knobs: str, extra: str, match: str):
    with pytest.raises(KnobError, match=match) as err:
        read_declarations(_harness(knobs, extra=extra))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("signals", "match"),
    [
        ('{"votes": {"kind": "alternative", "raises": "NOPE"}}', "not a declared knob"),
        ('{"votes": {"kind": "ranking", "family": "nope"}}', "not a declared knob family"),
        ('{"votes": {"kind": "alternative", "bound_family": "nope"}}', "bound_family"),
        ('{"votes": {"kind": "guess"}}', "malformed: kind"),
        ('{"votes": {"kind": "ranking", "colour": "red"}}', "malformed"),
        ('{"votes": "ranking"}', "must be a dict"),
    ],
)
def test_a_malformed_signal_is_a_one_line_error(signals: str, match: str):
    source = _harness('{"N": {"family": "f", "int": [1, 8]}}', extra=f"SIGNALS = {signals}")
    with pytest.raises(KnobError, match=match) as err:
        read_declarations(source)
    assert "\n" not in str(err.value)


def test_a_harness_that_does_not_parse_is_a_knob_error():
    with pytest.raises(KnobError, match="does not parse"):
        read_declarations("KNOBS = {\n")


def _knob(**fields) -> Knob:
    return Knob(name="K", family="f", **fields)


def test_neighbours_are_nearest_first_up_before_down():
    ladder = _knob(kind="ordered", choices=(0.0, 1.0, 3.0, 10.0))
    assert ladder.neighbours(1.0) == [3.0, 0.0, 10.0]
    assert ladder.neighbours(0.0) == [1.0, 3.0, 10.0]
    assert _knob(kind="choice", choices=("a", "b", "c")).neighbours("b") == ["a", "c"]
    assert _knob(kind="int", low=1, high=8).neighbours(3) == [4, 2, 5, 1]
    assert _knob(kind="int", low=80, high=480, step=80).neighbours(160) == [240, 80, 320]
    assert _knob(kind="int", low=1, high=16, log=True).neighbours(4) == [8, 2, 16, 1]
    rate = _knob(kind="float", low=0.0, high=1.6)
    assert rate.neighbours(0.8) == [1.0, 0.6, 1.2, 0.4]
    assert all(isinstance(v, int) for v in _knob(kind="int", low=1, high=8).neighbours(3))


def test_upward_climbs_the_domain_and_a_choice_has_no_up():
    assert _knob(kind="ordered", choices=(0.0, 1.0, 3.0)).upward(0.0) == [1.0, 3.0]
    assert _knob(kind="ordered", choices=(0.0, 1.0, 3.0)).upward(3.0) == []
    assert _knob(kind="int", low=1, high=16, log=True).upward(4) == [8, 16]
    assert _knob(kind="int", low=1, high=8).upward(6) == [7, 8]
    assert _knob(kind="choice", choices=("a", "b")).upward("a") == []


def test_contains_keeps_types_and_the_grid():
    assert not _knob(kind="choice", choices=(1, 2)).contains(True)
    assert not _knob(kind="int", low=1, high=8).contains(3.0)
    assert _knob(kind="float", low=0.0, high=1.0).contains(1)
    assert not _knob(kind="int", low=80, high=480, step=80).contains(100)
    assert _knob(kind="float", low=0.0, high=1.0, step=0.1).contains(0.30000000000000004)


def test_check_refuses_an_undeclared_knob_or_a_value_outside_its_domain():
    decl = read_declarations(LAWBENCH)
    decl.check({"PRIOR_WEIGHT": 3.0, "SHORTLIST_SOURCE": "classifier"})
    with pytest.raises(KnobError, match="not a declared knob"):
        decl.check({"INSTRUCTION": "x"})
    with pytest.raises(KnobError, match="outside"):
        decl.check({"PRIOR_WEIGHT": 2.0})
    with pytest.raises(KnobError, match="outside"):
        decl.check({"N_EXAMPLES": 9})


def test_constant_nodes_take_the_last_binding_and_drop_a_rebound_name():
    tree = ast.parse("A = 1\nA = 2\nB = 1\nB += 1\nC = f()\nD = 1\ndef D(): pass\nE: int = 3\n")
    nodes = constant_nodes(tree)
    assert set(nodes) == {"A"} and ast.literal_eval(nodes["A"].value) == 2


@pytest.mark.parametrize(
    ("when", "match"),
    [
        ('{"NOPE": [1]}', "names NOPE, not another knob"),
        ('{"K": [1]}', "names K, not another knob"),
        ('{"M": ["c"]}', "lists 'c', outside M's domain"),
        ('{"M": []}', "non-empty lists"),
    ],
)
def test_a_malformed_when_is_a_one_line_error(when: str, match: str):
    source = (
        'M = "a"\nK = 1\nKNOBS = {"M": {"family": "f", "choices": ["a", "b"]}, '
        f'"K": {{"family": "f", "values": [1, 2], "when": {when}}}}}\n'
    )
    with pytest.raises(KnobError, match=match):
        read_declarations(source)


def test_when_says_which_knobs_matter():
    source = (
        'M = "a"\nK = 1\nKNOBS = {"M": {"family": "f", "choices": ["a", "b"]}, '
        '"K": {"family": "f", "values": [1, 2], "when": {"M": ["b"]}}}\n'
    )
    decl = read_declarations(source)
    assert not decl.knobs["K"].active(decl.values)
    assert decl.knobs["K"].active({**decl.values, "M": "b"}) and decl.knobs["M"].active({})
