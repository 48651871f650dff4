"""The offline Meta-Agent searches the knobs a harness declares: focus, then Optuna, then
neighbours; it never repeats a setting on a parent and knows no template's names."""

import math

import pytest

from sialoop.agents.base import Proposal, TriedSetting
from sialoop.agents.meta import OfflineMetaAgent
from sialoop.harness.knobs import KnobError, read_declarations
from sialoop.records import Decision, Lever
from sialoop.tasks.templates import template_source

LAWBENCH = template_source("sialoop.tasks.lawbench", "fewshot.py")

MATH_QA = '''"""A math QA harness: k sampled solutions, majority vote on the final number."""

N_SAMPLES = 4
TEMPERATURE = 0.7
PROMPT = "plain"  # how the question is put
KNOBS = {
    "N_SAMPLES": {"family": "sampling", "int": [1, 16], "log": True},
    "TEMPERATURE": {"family": "sampling", "float": [0.0, 1.5]},
    "PROMPT": {"family": "prompt", "choices": ["plain", "step_by_step", "answer_first"]},
}
SIGNALS = {"votes": {"kind": "alternative", "family": "sampling", "raises": "N_SAMPLES"}}
ANSWER = "answer"


def solve(instance, llm):
    return {"answer": "0", "votes": ["0"]}
'''


def _decision(**settings) -> Decision:
    return Decision(run_id="r", generation=1, lever=Lever.harness, rationale="t", settings=settings)


def _raise(knob: str, gap: float, focus: str) -> Decision:
    return _decision(focus=focus, gap=gap, **{"raise": knob})


def _tried(version_id: str, parent_id: str | None, source: str, score: float | None):
    values = read_declarations(source).values
    return TriedSetting(
        version_id=version_id, parent_id=parent_id, values=values, oriented_score=score
    )


def _in_domain(source: str, proposal: Proposal) -> None:
    decl = read_declarations(source)
    decl.check(proposal.assignments)  # raises outside the domain
    for name, value in proposal.assignments.items():
        assert type(value) is type(decl.values[name]) or decl.knobs[name].kind == "float"


def test_the_lawbench_path_prior_up_twice_then_the_classifier():
    """The sequence behind the 75.1% LawBench harness, from the real template."""
    agent = OfflineMetaAgent()
    history = [_tried("v0", None, LAWBENCH, 0.60)]
    first = agent.propose(LAWBENCH, _raise("PRIOR_WEIGHT", 0.42, "scoring"), history, "v0")
    assert first is not None and first.assignments == {"PRIOR_WEIGHT": 3.0}
    assert first.family == "scoring" and first.search == "focus"
    assert "PRIOR_WEIGHT 0.0 → 3.0" in first.why and "raise PRIOR_WEIGHT" in first.why
    v1 = agent.write(LAWBENCH, first)
    history.append(_tried("v1", "v0", v1, 0.68))
    second = agent.propose(v1, _raise("PRIOR_WEIGHT", 0.31, "scoring"), history, "v1")
    assert second is not None and second.assignments == {"PRIOR_WEIGHT": 30.0}
    v2 = agent.write(v1, second)
    history.append(_tried("v2", "v1", v2, 0.72))
    third = agent.propose(v2, _decision(focus="shortlist"), history, "v2")
    assert third is not None and third.assignments == {"SHORTLIST_SOURCE": "classifier"}
    assert "SHORTLIST_SOURCE 'neighbours' → 'classifier'" in third.why
    v3 = agent.write(v2, third)
    assert read_declarations(v3).values == {
        **read_declarations(LAWBENCH).values,
        "PRIOR_WEIGHT": 30.0,
        "SHORTLIST_SOURCE": "classifier",
    }


def test_a_big_gap_skips_a_rung_first_and_a_small_one_climbs_in_order():
    agent = OfflineMetaAgent()

    def two(gap: float) -> list[float]:
        history: list[TriedSetting] = []
        out = []
        for i in range(2):
            p = agent.propose(LAWBENCH, _raise("PRIOR_WEIGHT", gap, "scoring"), history, "v0")
            assert p is not None
            out.append(p.assignments["PRIOR_WEIGHT"])
            history.append(_tried(f"c{i}", "v0", agent.write(LAWBENCH, p), None))
        return out

    assert two(0.5) == [3.0, 1.0]
    assert two(0.1) == [1.0, 3.0]


def test_the_focus_rotates_once_it_has_out_tried_the_other_families():
    agent = OfflineMetaAgent()
    history = [
        _tried(f"c{i}", "v0", agent.write(LAWBENCH, Proposal(assignments=a, why="t")), 0.5)
        for i, a in enumerate([{"PRIOR_WEIGHT": 1.0}, {"PRIOR_WEIGHT": 3.0}])
    ]
    rotated = agent.propose(LAWBENCH, _decision(focus="scoring"), history, "v0")
    assert rotated is not None and rotated.family == "examples"  # the untried family first
    assert "rotated from focus scoring" in rotated.why
    one = agent.propose(LAWBENCH, _decision(focus="scoring"), history[:1], "v0")
    assert one is not None and one.family == "scoring"  # one try: the focus still leads


def test_a_setting_the_run_scored_under_another_parent_waits():
    agent = OfflineMetaAgent()
    v1 = agent.write(LAWBENCH, Proposal(assignments={"PRIOR_WEIGHT": 3.0}, why="t"))
    elsewhere = agent.write(LAWBENCH, Proposal(assignments={"PRIOR_WEIGHT": 10.0}, why="t"))
    history = [_tried("v1", "v0", v1, 0.6), _tried("x", "v0", elsewhere, 0.5)]
    p = agent.propose(v1, _decision(focus="scoring"), history, "v1")
    assert p is not None and p.assignments == {"PRIOR_WEIGHT": 1.0}  # 10.0 is known, 1.0 not


def test_another_harness_focus_moves_come_from_its_own_knobs():
    agent = OfflineMetaAgent()
    prompt = agent.propose(MATH_QA, _decision(focus="prompt"), [], "v0")
    assert prompt is not None and prompt.assignments == {"PROMPT": "step_by_step"}
    raised = agent.propose(MATH_QA, _raise("N_SAMPLES", 0.5, "sampling"), [], "v0")
    assert raised is not None and raised.assignments == {"N_SAMPLES": 16}  # log: 4 → 8 → 16
    sampling = agent.propose(MATH_QA, _decision(focus="sampling"), [], "v0")
    assert sampling is not None and sampling.assignments == {"N_SAMPLES": 8}
    _in_domain(MATH_QA, sampling)


def test_another_harness_without_focus_goes_to_optuna():
    agent = OfflineMetaAgent(seed=3)
    history = [_tried("v0", None, MATH_QA, 0.4)]
    p = agent.propose(MATH_QA, _decision(focus=None), history, "v0")
    assert p is not None and p.search == "optuna" and "seeded with 1 trials" in p.why
    assert set(p.assignments) <= {"N_SAMPLES", "TEMPERATURE", "PROMPT"}
    _in_domain(MATH_QA, p)
    agent.write(MATH_QA, p)


def _score(values: dict) -> float:
    """A made-up val score: more samples and a moderate temperature help."""
    return (
        math.log2(values["N_SAMPLES"]) / 4
        - abs(values["TEMPERATURE"] - 0.5)
        + (values["PROMPT"] == "step_by_step") * 0.2
    )


@pytest.mark.parametrize("source", [MATH_QA, LAWBENCH])
def test_optuna_seeded_with_history_never_repeats_on_a_parent(source: str):
    agent = OfflineMetaAgent(seed=7)
    parent = read_declarations(source).values
    history = [TriedSetting(version_id="v0", parent_id=None, values=parent, oriented_score=0.1)]
    settings = [parent]
    for i in range(15):
        p = agent.propose(source, _decision(), history, "v0")
        assert p is not None and p.search in ("optuna", "neighbour")
        _in_domain(source, p)
        values = read_declarations(agent.write(source, p)).values
        assert values not in settings
        settings.append(values)
        score = _score(values) if source is MATH_QA else (None if i % 4 == 0 else i / 20)
        history.append(
            TriedSetting(version_id=f"c{i}", parent_id="v0", values=values, oriented_score=score)
        )


def test_a_small_space_runs_out_without_repeating():
    source = template_source("sialoop.tasks.toy", "option_scoring.py")
    agent = OfflineMetaAgent()
    history: list[TriedSetting] = []
    seen = [read_declarations(source).values]
    while (p := agent.propose(source, _decision(focus="examples"), history, "v0")) is not None:
        values = read_declarations(agent.write(source, p)).values
        assert values not in seen
        seen.append(values)
        history.append(
            TriedSetting(version_id="c", parent_id="v0", values=values, oriented_score=0.5)
        )
        assert len(seen) <= 16  # 8 example counts x 2 normalisations
    assert len(seen) >= 12


def test_the_same_inputs_give_the_same_proposal():
    history = [_tried("v0", None, MATH_QA, 0.4), _tried("c0", "v0", MATH_QA, None)]
    first = OfflineMetaAgent(seed=1).propose(MATH_QA, _decision(), history, "v0")
    again = OfflineMetaAgent(seed=1).propose(MATH_QA, _decision(), history, "v0")
    assert first == again
    law = [OfflineMetaAgent().propose(LAWBENCH, _decision(), history, "v0") for _ in range(2)]
    assert law[0] == law[1]


def test_history_from_another_domain_or_harness_is_tolerated():
    history = [
        TriedSetting(
            version_id="a", parent_id=None, values={"PRIOR_WEIGHT": 0.5}, oriented_score=1
        ),
        TriedSetting(version_id="b", parent_id=None, values={"OTHER": 1}, oriented_score=0.2),
        TriedSetting(version_id="c", parent_id="v0", values={}, oriented_score=None),
    ]
    p = OfflineMetaAgent().propose(LAWBENCH, _decision(), history, "v0")
    assert p is not None
    _in_domain(LAWBENCH, p)


def test_a_harness_without_knobs_gets_no_proposal():
    zero = template_source("sialoop.tasks.lawbench", "zeroshot.py")
    assert OfflineMetaAgent().propose(zero, _decision(focus="scoring"), [], "v0") is None
    bare = "N = 3\n\ndef solve(instance, llm):\n    return {}\n"
    assert OfflineMetaAgent().propose(bare, _decision(), [], "v0") is None


def test_a_focus_or_raise_the_harness_lacks_is_noted_and_a_bad_gap_refused():
    p = OfflineMetaAgent().propose(MATH_QA, _raise("SHORTLIST", 0.5, "shortlist"), [], "v0")
    assert p is not None and p.search == "optuna"
    assert "focus 'shortlist' names no declared family" in p.why
    assert "raise 'SHORTLIST' names no declared knob" in p.why
    with pytest.raises(ValueError, match="gap"):
        OfflineMetaAgent().propose(MATH_QA, _raise("N_SAMPLES", 2.0, "sampling"), [], "v0")


def test_write_refuses_a_value_outside_the_domain_or_an_undeclared_knob():
    agent = OfflineMetaAgent()
    with pytest.raises(KnobError, match="outside"):
        agent.write(MATH_QA, Proposal(assignments={"N_SAMPLES": 32}, why="t"))
    with pytest.raises(KnobError, match="not a declared knob"):
        agent.write(LAWBENCH, Proposal(assignments={"INSTRUCTION": "x"}, why="t"))
    out = agent.write(MATH_QA, Proposal(assignments={"TEMPERATURE": 1.2}, why="t"))
    assert 'TEMPERATURE = 1.2\nPROMPT = "plain"  # how the question is put' in out


VOTING = MATH_QA.replace(
    """    "PROMPT": {"family": "prompt", "choices": ["plain", "step_by_step", "answer_first"]},
}""",
    """    "PROMPT": {"family": "prompt", "choices": ["plain", "step_by_step", "answer_first"]},
    "VOTE": {"family": "sampling", "choices": ["majority", "weighted"],
             "when": {"N_SAMPLES": [2, 4, 8]}},
}""",
).replace('PROMPT = "plain"', 'PROMPT = "plain"\nVOTE = "majority"')


@pytest.mark.parametrize(
    ("source", "parent"),
    [
        # a program task's template: with no smoothing, its graph knobs change nothing
        (template_source("sialoop.tasks.denoise", "pipeline.py"), {"METHOD": "none"}),
        # an answer task's harness: with one sample there is nothing to vote on
        (VOTING, {"N_SAMPLES": 1}),
    ],
)
def test_a_knob_that_does_not_matter_under_the_parent_is_never_moved(source, parent):
    from sialoop.harness.operators import apply_assignments

    source = apply_assignments(source, parent)
    decl = read_declarations(source)
    idle = {n for n, k in decl.knobs.items() if not k.active(decl.values)}
    assert idle  # the parent leaves some knobs without effect
    agent, history = OfflineMetaAgent(), [_tried("v0", None, source, 0.5)]
    for _ in range(12):
        p = agent.propose(source, _decision(), history, "v0")
        assert p is not None
        setting = {**decl.values, **p.assignments}
        # a proposal moves at least one knob that matters under the setting it makes
        assert any(decl.knobs[n].active(setting) for n in p.assignments), p.assignments
        history.append(
            TriedSetting(version_id=f"v{len(history)}", parent_id="v0", values=setting,
                         oriented_score=0.4)
        )  # fmt: skip
