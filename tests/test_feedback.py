"""The offline Feedback-Agent on synthetic but real trajectories: each rule, the choice between
levers, the method, stopping, and the rationale's numbers."""

from __future__ import annotations

import json
import re

import pytest

from sialoop.agents.evidence import FailureClass, Outcome, compute_evidence
from sialoop.agents.feedback import (
    Budget,
    History,
    OfflineFeedbackAgent,
    OfflineFeedbackSettings,
)
from sialoop.records import Decision, ErrorKind, Lever, RolloutError, Score, Trajectory
from sialoop.train.base import TrainSettings

OPTIONS = [f"c{i}" for i in range(10)]
PLENTY = Budget(minutes_left=600)


def traj(iid, gold, pred, *, ranked=None, prior=None, sample=0, error=None) -> Trajectory:
    """One rollout scored the way classification tasks score (detail: prediction, valid, gold)."""
    common = {"run_id": "r", "version_id": "v1", "split": "train", "instance_id": iid}
    if error is not None:
        err = RolloutError(kind=error, message="boom")
        return Trajectory(**common, sample=sample, error=err, seconds=1.0)
    label = pred if isinstance(pred, str) else None
    valid = label in OPTIONS
    correct = valid and label == gold
    score = Score(
        value=float(correct),
        correct=correct,
        detail={"prediction": label, "valid": valid, "gold": gold},
    )
    output = pred if ranked is None else {"label": pred, "ranked": ranked}
    if prior is not None:
        output = {**output, "prior_ranked": prior}
    return Trajectory(**common, sample=sample, output=output, score=score, seconds=1.0)


def decide(trajs, history=(), budget=PLENTY, settings=None) -> Decision:
    agent = OfflineFeedbackAgent(settings)
    return agent.decide(trajs, History(outcomes=tuple(history)), budget, run_id="r", generation=3)


def outcome(lever, accepted, gain, minutes=10.0, method=None) -> Outcome:
    decision = Decision(run_id="r", generation=1, lever=lever, rationale="-", method=method)
    return Outcome(decision=decision, accepted=accepted, val_gain=gain, minutes=minutes)


def format_batch() -> list[Trajectory]:
    """8 correct, 7 labels outside the option set, 5 unparsable outputs."""
    out = [traj(f"ok{i}", "c1", "c1") for i in range(8)]
    out += [traj(f"bad{i}", "c1", "not a charge") for i in range(7)]
    out += [traj(f"none{i}", "c1", None) for i in range(5)]
    return out


def pattern_batch(k: int = 1, vary: bool = False) -> list[Trajectory]:
    """10 correct instances; 20 wrong ones where gold is always ranked 2nd and the mistakes are
    two repeated confusions (c0 -> c5, c1 -> c6). With `vary`, sample 0 of each wrong instance
    gets it right, so those groups have reward variance."""
    out = []
    for i in range(10):
        out += [traj(f"ok{i}", "c2", "c2", ranked=["c2", "c3"], sample=s) for s in range(k)]
    for i in range(20):
        gold, pred = OPTIONS[i % 2], OPTIONS[i % 2 + 5]
        for s in range(k):
            if vary and s == 0:
                out.append(traj(f"w{i}", gold, gold, ranked=[gold, pred], sample=s))
            else:
                out.append(traj(f"w{i}", gold, pred, ranked=[pred, gold, "c9"], sample=s))
    return out


def absent_batch() -> list[Trajectory]:
    """10 correct; 20 wrong with a shortlist that never holds gold, no confusion repeated."""
    out = [traj(f"ok{i}", "c2", "c2", ranked=["c2", "c3"]) for i in range(10)]
    for j in range(20):
        gold, pred = OPTIONS[j % 10], OPTIONS[(j + 1 + j // 10) % 10]
        shortlist = [pred, *[o for o in OPTIONS if o not in (gold, pred)][:2]]
        out.append(traj(f"w{j}", gold, pred, ranked=shortlist))
    return out


def test_evidence_counts_each_failure_class_and_view():
    trajs = [
        *format_batch(),
        traj("t", "c1", None, error=ErrorKind.timeout),
        traj("x", "c1", None, error=ErrorKind.crash),
        traj("p", "c1", None, error=ErrorKind.policy),
        traj("w1", "c0", "c5", ranked=["c5", "c0"]),
        traj("w2", "c0", "c5", ranked=["c5", "c4", "c3", "c0"]),
        traj("w3", "c3", "c4", ranked=["c4", "c5"]),
    ]
    history = [outcome(Lever.harness, True, 0.1, 20.0), outcome(Lever.harness, False, -0.01)]
    ev = compute_evidence(trajs, history)
    f = ev.failures
    assert (ev.n, f[FailureClass.correct], f[FailureClass.invalid_label]) == (26, 8, 7)
    assert f[FailureClass.unparsable] == 5 and f[FailureClass.wrong_valid] == 3
    assert f[FailureClass.timeout] == f[FailureClass.crash] == f[FailureClass.other_error] == 1
    assert ev.format_share == pytest.approx(12 / 26)
    assert (ev.confusions[0].gold, ev.confusions[0].predicted, ev.confusions[0].count) == (
        "c0",
        "c5",
        2,
    )
    assert ev.repeated_confusion_share == pytest.approx(2 / 3)
    assert (ev.ranks.rank1, ev.ranks.near, ev.ranks.far, ev.ranks.absent) == (0, 1, 1, 1)
    assert ev.n_ranked_wrong == 3 and ev.absent_share == pytest.approx(1 / 3)
    assert ev.worst_classes[0].label == "c0" and ev.worst_classes[0].accuracy == 0.0
    assert ev.groups.n_groups == 0
    harness = ev.levers[Lever.harness]
    assert (harness.attempts, harness.accepted, harness.trailing_rejections) == (2, 1, 1)
    assert harness.gain_per_minute == pytest.approx(0.1 / 30.0)
    assert ev.levers[Lever.weights].gain_per_minute is None
    assert ev.rejection_streak == 1


def test_group_variance_only_counts_instances_with_several_samples():
    flat = compute_evidence(pattern_batch(k=4))
    assert flat.groups.n_groups == 30 and flat.groups.share_with_variance == 0.0
    varied = compute_evidence(pattern_batch(k=4, vary=True))
    assert varied.groups.share_with_variance == pytest.approx(20 / 30)
    assert varied.groups.mean_variance > 0 and varied.groups.group_size == 4


def test_format_failures_lead_to_harness_format():
    d = decide(format_batch())
    assert d.lever is Lever.harness
    assert d.settings["focus"] == "format"
    assert d.evidence["rule"] == "format_failures"


def test_learnable_pattern_leads_to_weights_sft():
    d = decide(pattern_batch())
    assert d.lever is Lever.weights and d.method == "sft"
    assert d.evidence["rule"] == "learnable_pattern"
    assert d.evidence["focus"] == "near_miss"
    TrainSettings.model_validate(d.settings)  # weights settings go to the trainer as they are


def test_gold_absent_from_shortlist_leads_to_harness_shortlist():
    d = decide(absent_batch())
    assert d.lever is Lever.harness
    assert d.settings["focus"] == "shortlist"
    assert d.evidence["rule"] == "gold_absent"


@pytest.mark.parametrize("batch", [pattern_batch(k=4), absent_batch(), format_batch()])
@pytest.mark.parametrize(
    "settings",
    [
        OfflineFeedbackSettings(),
        OfflineFeedbackSettings(grpo_min_groups=1, grpo_variance_share=0.001),
    ],
)
def test_no_reward_variance_never_leads_to_grpo(batch, settings):
    # The harness lever is made stale so the weights lever is chosen even without a pattern.
    stale = [outcome(Lever.harness, False, 0.0)] * 3
    d = decide(batch, history=stale, settings=settings.model_copy(update={"max_rejections": 9}))
    assert d.lever is Lever.weights
    assert d.method == "sft"


def test_reward_variance_and_a_pattern_lead_to_grpo():
    d = decide(pattern_batch(k=4, vary=True))
    assert d.lever is Lever.weights and d.method == "grpo"
    assert TrainSettings.model_validate(d.settings).group_size == 4
    assert "67%" in d.rationale


def test_grpo_that_does_not_fit_the_budget_falls_back_to_sft():
    d = decide(pattern_batch(k=4, vary=True), budget=Budget(minutes_left=30))
    assert d.lever is Lever.weights and d.method == "sft"


def test_a_lever_that_keeps_failing_yields_to_the_other():
    assert decide(format_batch()).lever is Lever.harness
    failing = [outcome(Lever.harness, False, -0.01) for _ in range(3)]
    d = decide(format_batch(), history=failing)
    assert d.lever is Lever.weights
    assert d.evidence["chosen_by"] == "other_lever_stale"
    assert "last 3 candidates" in d.rationale


def mixed_batch() -> list[Trajectory]:
    """Both levers have support: 25% invalid labels and a near-miss pattern."""
    return pattern_batch() + [traj(f"bad{i}", "c1", "nonsense") for i in range(10)]


def test_between_supported_levers_history_gain_per_minute_decides():
    untried = decide(mixed_batch())
    assert untried.lever is Lever.weights and untried.evidence["chosen_by"] == "addressable"
    harness_pays = [outcome(Lever.harness, True, 0.05), outcome(Lever.weights, True, 0.01)]
    d = decide(mixed_batch(), history=harness_pays)
    assert d.lever is Lever.harness and d.evidence["chosen_by"] == "gain_per_minute"
    weights_pays = [outcome(Lever.harness, True, 0.01), outcome(Lever.weights, True, 0.05)]
    assert decide(mixed_batch(), history=weights_pays).lever is Lever.weights


def test_an_untried_supported_lever_is_explored():
    tried = [outcome(Lever.weights, True, 0.05, method="sft")]
    d = decide(mixed_batch(), history=tried)
    assert d.lever is Lever.harness and d.evidence["chosen_by"] == "explore_untried"


@pytest.mark.parametrize(
    ("budget", "rule"),
    [
        (Budget(minutes_left=2), "budget"),
        (Budget(minutes_left=600, generations_left=0), "no_generations"),
    ],
)
def test_exhausted_budget_stops(budget, rule):
    d = decide(pattern_batch(), budget=budget)
    assert d.lever is Lever.stop and d.evidence["rule"] == rule


def test_budget_stop_is_decided_before_the_rollout():
    agent = OfflineFeedbackAgent()
    kw = {"run_id": "r", "generation": 4}
    assert agent.decide_before_rollout(History(outcomes=()), PLENTY, **kw) is None
    spent = agent.decide_before_rollout(History(outcomes=()), Budget(minutes_left=2), **kw)
    assert spent is not None and spent.lever is Lever.stop
    assert spent.evidence["rule"] == "budget" and "2.0 min left" in spent.rationale
    # the estimate comes from history: a harness attempt that took 1 min fits 2 min left
    quick = [outcome(Lever.harness, True, 0.01, minutes=1.0)]
    assert (
        agent.decide_before_rollout(History(outcomes=tuple(quick)), Budget(minutes_left=2), **kw)
        is None
    )


def test_budget_estimates_come_from_history():
    slow = [outcome(Lever.harness, True, 0.01, minutes=50.0)]
    d = decide(format_batch(), history=slow, budget=Budget(minutes_left=30))
    assert d.lever is Lever.weights  # the harness now takes ~50 min; SFT's 20 fits
    assert "does not fit" in d.rationale


def test_consecutive_rejections_across_levers_stop():
    history = [outcome(Lever.harness if i % 2 else Lever.weights, False, 0.0) for i in range(5)]
    d = decide(format_batch(), history=history)
    assert d.lever is Lever.stop and d.evidence["rule"] == "stalled"


def test_a_solved_batch_stops():
    d = decide([traj(f"ok{i}", "c1", "c1") for i in range(20)])
    assert d.lever is Lever.stop and d.evidence["rule"] == "solved"


def test_rationale_cites_the_numbers_and_evidence_is_stored():
    d = decide(format_batch())
    assert "60% of 20 outputs" in d.rationale  # 12 of 20 invalid or unparsable
    assert "7 labels outside the option set, 5 unparsable" in d.rationale
    assert "accuracy 40%" in d.rationale
    assert len(re.findall(r"\d+%", d.rationale)) >= 3
    assert d.evidence["accuracy"] == pytest.approx(0.4)
    assert (d.run_id, d.generation) == ("r", 3)
    json.dumps(d.model_dump(mode="json"))


def test_no_trajectories_is_an_error():
    with pytest.raises(ValueError, match="trajectories"):
        decide([])


def prior_batch(prior_right: int, answer_follows_prior: bool) -> list[Trajectory]:
    """20 items, gold always shortlisted but ranked far when the answer is wrong (no near miss
    for the weights lever): the prior ranks gold first on `prior_right` of them; the answer
    either follows the prior or is right on 4 items only."""
    out = []
    for i in range(20):
        # A distinct (gold, wrong) pair per item: no repeated confusion for the weights lever.
        gold, other = OPTIONS[i % 10], OPTIONS[(i % 10 + 1 + i // 10) % 10]
        prior = [gold, other] if i < prior_right else [other, gold]
        pred = prior[0] if answer_follows_prior else (gold if i < 4 else other)
        rest = [o for o in OPTIONS if o not in (gold, other)][:3]
        ranked = [pred, *rest, gold if pred == other else other]  # gold far when wrong
        out.append(traj(f"p{i}", gold, pred, ranked=ranked, prior=prior))
    return out


def test_a_prior_better_than_the_answer_leads_to_scoring_with_the_hint():
    d = decide(prior_batch(prior_right=14, answer_follows_prior=False))
    assert d.lever is Lever.harness and d.evidence["rule"] == "unused_prior", d.rationale
    assert d.settings == {"focus": "scoring", "hint": "prior_up", "prior_gap": pytest.approx(0.5)}
    prior = d.evidence["prior"]
    assert (prior["accuracy"], prior["answer_accuracy"]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert "70%" in d.rationale and "20%" in d.rationale


def test_an_answer_that_follows_its_prior_points_at_the_shortlist():
    d = decide(prior_batch(prior_right=12, answer_follows_prior=True))
    assert d.evidence["prior"]["agreement"] == 1.0
    assert d.lever is Lever.harness and d.evidence["rule"] == "prior_bound", d.rationale
    assert d.settings["focus"] == "shortlist"


def test_no_prior_in_the_outputs_means_no_prior_view():
    ev = compute_evidence([traj("a", "c1", "c1", ranked=["c1"])])
    assert ev.prior is None


def test_an_untried_lever_is_explored_only_while_it_is_affordable():
    """Both levers supported, weights never tried: explored with time to spare, not with the
    last of the budget (one SFT attempt is estimated at 20 min by default)."""
    batch = prior_batch(prior_right=14, answer_follows_prior=False)
    # Near misses for the weights lever: gold ranked second in every wrong answer.
    batch = [
        t.model_copy(
            update={
                "output": {
                    **t.output,
                    "ranked": [t.output["label"], t.score.detail["gold"]]
                    if not t.score.correct
                    else t.output["ranked"],
                }
            }
        )
        for t in batch
    ]
    history = [outcome(Lever.harness, True, 0.3, minutes=7.0)]
    roomy = decide(batch, history, Budget(minutes_left=100))
    assert roomy.lever is Lever.weights and roomy.evidence["chosen_by"] == "explore_untried"
    tight = decide(batch, history, Budget(minutes_left=30))
    assert tight.lever is Lever.harness, tight.rationale
    assert tight.evidence["chosen_by"] == "gain_per_minute"
