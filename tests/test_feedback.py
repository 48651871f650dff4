"""The offline Feedback-Agent on synthetic but real trajectories: each rule, the choice between
levers, the method, stopping, and the rationale's numbers; for an answer task with LawBench's
declarations, a second answer task with different ones (a math harness voting over samples),
and a lower-is-better measurement task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sialoop.agents.evidence import FailureClass, compute_evidence
from sialoop.agents.feedback import (
    Budget,
    FeedbackContext,
    History,
    OfflineFeedbackAgent,
    OfflineFeedbackSettings,
    Outcome,
)
from sialoop.harness.knobs import read_declarations
from sialoop.records import Decision, ErrorKind, Lever, RolloutError, Score, Trajectory
from sialoop.tasks.base import ACCURACY, Metric
from sialoop.train.base import TrainSettings

OPTIONS = [f"c{i}" for i in range(10)]
PLENTY = Budget(minutes_left=600)

# The LawBench harness's declarations (knob families and signals), read as the loop reads them.
LAW = FeedbackContext(
    metric=ACCURACY,
    declarations=read_declarations(
        """
N_EXAMPLES = 3
SHORTLIST = 8
PRIOR_WEIGHT = 0.0
QUERY_CHARS = 400
KNOBS = {
    "N_EXAMPLES": {"family": "examples", "int": [0, 8]},
    "SHORTLIST": {"family": "shortlist", "values": [4, 8, 16]},
    "PRIOR_WEIGHT": {"family": "scoring", "values": [0.0, 1.0, 3.0, 10.0]},
    "QUERY_CHARS": {"family": "format", "int": [200, 1200]},
}
SIGNALS = {
    "ranked": {"kind": "ranking", "family": "shortlist"},
    "prior_ranked": {"kind": "alternative", "family": "scoring", "raises": "PRIOR_WEIGHT",
                     "bound_family": "shortlist"},
}
"""
    ),
)
# A second answer task: a math harness that votes over samples; its answer is under "answer".
MATH = FeedbackContext(
    metric=ACCURACY,
    declarations=read_declarations(
        """
TEMPERATURE = 0.7
N_SAMPLES = 4
KNOBS = {
    "TEMPERATURE": {"family": "sampling", "float": [0.0, 1.5]},
    "N_SAMPLES": {"family": "sampling", "int": [1, 16], "log": True},
}
SIGNALS = {"votes": {"kind": "alternative", "family": "sampling", "raises": "N_SAMPLES"}}
ANSWER = "answer"
"""
    ),
)
# A measurement task: mean squared error, lower is better, no notion of "correct".
MSE = FeedbackContext(metric=Metric(name="mse", direction="lower"))


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
    return Trajectory(**common, sample=sample, output=output, score=score, seconds=1.0, tokens=100)


def measured(iid, value, *, sample=0, error=None) -> Trajectory:
    """One rollout of the measurement task: a program scored by its error, no gold."""
    common = {"run_id": "r", "version_id": "v1", "split": "train", "instance_id": iid}
    if error is not None:
        err = RolloutError(kind=error, message="boom")
        return Trajectory(**common, sample=sample, error=err, seconds=2.0)
    output = {"program": "def f(x): return x"}
    score = Score(value=value, detail={"units": [value]})
    return Trajectory(**common, sample=sample, output=output, score=score, seconds=2.0)


def decide(trajs, history=(), budget=PLENTY, settings=None, context=LAW) -> Decision:
    agent = OfflineFeedbackAgent(settings)
    return agent.decide(
        trajs, History(outcomes=tuple(history)), budget, context, run_id="r", generation=3
    )


def outcome(lever, accepted, gain, minutes=10.0, method=None, focus=None) -> Outcome:
    settings = {"focus": focus} if focus else {}
    decision = Decision(
        run_id="r", generation=1, lever=lever, rationale="-", method=method, settings=settings
    )
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


def noise_batch() -> list[Trajectory]:
    """8 correct, 12 wrong with no ranking and no confusion repeated: no rule fires."""
    out = [traj(f"ok{i}", "c1", "c1") for i in range(8)]
    for j in range(12):
        gold, pred = OPTIONS[j % 10], OPTIONS[(j + 1 + j // 10) % 10]
        out.append(traj(f"w{j}", gold, pred))
    return out


def mse_batch(k: int = 1, vary: bool = False) -> list[Trajectory]:
    """12 programs; with k samples each, and with `vary` their errors differ within a group."""
    return [
        measured(f"p{i}", 0.1 * (i + 1) + (0.05 * s if vary else 0.0), sample=s)
        for i in range(12)
        for s in range(k)
    ]


# -- evidence --------------------------------------------------------------------------------


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
    ev = compute_evidence(trajs, LAW, history)
    f = ev.failures
    assert (ev.n, f[FailureClass.correct], f[FailureClass.invalid_label]) == (26, 8, 7)
    assert f[FailureClass.unparsable] == 5 and f[FailureClass.wrong_valid] == 3
    assert f[FailureClass.timeout] == f[FailureClass.crash] == f[FailureClass.other_error] == 1
    assert f[FailureClass.scored] == 0
    assert ev.accuracy == pytest.approx(8 / 26) and ev.format_share == pytest.approx(12 / 26)
    top = ev.confusions[0]
    assert (top.gold, top.predicted, top.count) == ("c0", "c5", 2)
    assert ev.repeated_confusion_share == pytest.approx(2 / 3)
    ranks = ev.rankings["ranked"]
    assert (ranks.rank1, ranks.near, ranks.far, ranks.absent) == (0, 1, 1, 1)
    assert ranks.n_wrong == 3 and ranks.absent_share == pytest.approx(1 / 3)
    assert ev.alternatives == {}  # no output carried the declared alternative
    assert ev.worst_classes[0].label == "c0" and ev.worst_classes[0].accuracy == 0.0
    assert ev.groups.n_groups == 0 and ev.groups.mean_variance is None
    assert ev.scores.n_scored == 23 and ev.scores.share_scored == pytest.approx(23 / 26)
    assert ev.seconds_per_item == 1.0 and ev.tokens_per_item == 100
    harness = ev.levers[Lever.harness]
    assert (harness.attempts, harness.accepted, harness.trailing_rejections) == (2, 1, 1)
    assert harness.gain_per_minute == pytest.approx(0.1 / 30.0)
    assert ev.levers[Lever.weights].gain_per_minute is None
    assert ev.rejection_streak == 1


def test_signals_are_read_only_where_declared():
    ev = compute_evidence(pattern_batch(), FeedbackContext(metric=ACCURACY))
    assert ev.rankings == {} and ev.alternatives == {}


def test_a_measurement_task_has_no_accuracy_and_an_oriented_distribution():
    trajs = [*mse_batch(), measured("e", 0.0, error=ErrorKind.crash)]
    ev = compute_evidence(trajs, MSE)
    assert ev.accuracy is None and ev.per_class == [] and ev.confusions == []
    assert ev.failures[FailureClass.scored] == 12 and ev.failures[FailureClass.correct] == 0
    d = ev.scores
    assert (d.raw_best, d.raw_worst) == (pytest.approx(0.1), pytest.approx(1.2))
    assert (d.best, d.worst) == (pytest.approx(-0.1), pytest.approx(-1.2))
    assert d.mean == pytest.approx(-0.65) and d.raw_median == pytest.approx(0.65)
    assert d.share_scored == pytest.approx(12 / 13)
    assert ev.tokens_per_item is None  # no trajectory knew its tokens
    assert ev.seconds_per_item == 2.0


def test_an_empty_batch_has_no_made_up_numbers():
    ev = compute_evidence([], LAW)
    assert ev.accuracy is None and ev.format_share is None and ev.failure_shares == {}
    assert ev.scores.mean is None and ev.scores.share_scored is None
    assert ev.seconds_per_item is None and ev.groups.share_with_variance is None


def test_group_variance_only_counts_instances_with_several_samples():
    flat = compute_evidence(pattern_batch(k=4), LAW)
    assert flat.groups.n_groups == 30 and flat.groups.share_with_variance == 0.0
    varied = compute_evidence(pattern_batch(k=4, vary=True), LAW)
    assert varied.groups.share_with_variance == pytest.approx(20 / 30)
    assert (varied.groups.mean_variance or 0) > 0 and varied.groups.group_size == 4


def test_an_unscored_sample_is_the_worst_of_its_group_never_zero():
    # mse has no failure value: a crash among samples scoring 0.5 is not a perfect 0.0 error.
    group = [measured("a", 0.5, sample=0), measured("a", 0.5, sample=1)]
    group.append(measured("a", 0.0, sample=2, error=ErrorKind.crash))
    g = compute_evidence(group, MSE).groups
    assert g.mean_variance == pytest.approx(0.0)  # filled with 0.5, the group's worst
    assert g.share_with_variance == 1.0  # but a failure differs from what was scored
    # accuracy's failure value (0) is what an unscored sample counts as
    acc = [traj("b", "c1", "c1", sample=0), traj("b", "c1", None, sample=1, error=ErrorKind.crash)]
    assert compute_evidence(acc, LAW).groups.mean_variance == pytest.approx(0.25)


def test_gains_never_measured_count_as_no_gain():
    history = [outcome(Lever.weights, True, None, minutes=5.0), outcome(Lever.weights, True, 0.2)]
    stats = compute_evidence(noise_batch(), LAW, history).levers[Lever.weights]
    assert stats.total_gain == pytest.approx(0.2) and stats.gain_per_minute == pytest.approx(
        0.2 / 15
    )


# -- harness rules ---------------------------------------------------------------------------


def test_format_failures_lead_to_harness_format():
    d = decide(format_batch())
    assert d.lever is Lever.harness
    assert d.settings == {"focus": "format"}
    assert d.evidence["rule"] == "format_failures"


def test_format_failures_without_a_format_family_search_the_whole_space():
    d = decide(format_batch(), context=MATH)
    assert d.lever is Lever.harness and d.settings == {"focus": None}
    assert d.evidence["rule"] == "format_failures" and "whole knob space" in d.rationale


def test_gold_absent_from_a_ranking_focuses_its_family():
    d = decide(absent_batch())
    assert d.lever is Lever.harness
    assert d.settings == {"focus": "shortlist"}
    assert d.evidence["rule"] == "gold_absent"


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


def test_an_alternative_better_than_the_answer_raises_its_knob():
    """LawBench's declarations reproduce its unused-prior decision."""
    d = decide(prior_batch(prior_right=14, answer_follows_prior=False))
    assert d.lever is Lever.harness and d.evidence["rule"] == "alternative_beats_answer"
    assert d.settings == {"focus": "scoring", "raise": "PRIOR_WEIGHT", "gap": pytest.approx(0.5)}
    alt = d.evidence["alternatives"]["prior_ranked"]
    assert (alt["accuracy"], alt["answer_accuracy"]) == (pytest.approx(0.7), pytest.approx(0.2))
    assert (alt["beats"], alt["loses"]) == (pytest.approx(0.5), 0.0)
    assert "70%" in d.rationale and "20%" in d.rationale


def test_an_answer_that_follows_its_alternative_widens_the_bound_family():
    d = decide(prior_batch(prior_right=12, answer_follows_prior=True))
    assert d.evidence["alternatives"]["prior_ranked"]["agreement"] == 1.0
    assert d.lever is Lever.harness and d.evidence["rule"] == "answer_bound_by_alternative"
    assert d.settings == {"focus": "shortlist"}


def vote_batch() -> list[Trajectory]:
    """The math harness: 20 problems; the majority vote is right on 15, the answer on 5."""
    out = []
    for i in range(20):
        gold = str(i)
        answer = gold if i < 5 else str(i + 100)
        votes = [gold if i < 15 else str(i + 200), answer]
        score = Score(value=float(answer == gold), correct=answer == gold, detail={"gold": i})
        output = {"answer": answer, "votes": votes, "reasoning": "..."}
        out.append(
            Trajectory(
                run_id="r",
                version_id="v1",
                split="train",
                instance_id=f"m{i}",
                output=output,
                score=score,
                seconds=3.0,
            )
        )
    return out


def test_a_second_tasks_declarations_name_its_own_family_and_knob():
    d = decide(vote_batch(), context=MATH)
    assert d.lever is Lever.harness and d.evidence["rule"] == "alternative_beats_answer"
    assert d.settings == {"focus": "sampling", "raise": "N_SAMPLES", "gap": pytest.approx(0.5)}
    assert "'votes'" in d.rationale and "raise N_SAMPLES" in d.rationale
    assert d.evidence["alternatives"]["votes"]["agreement"] == pytest.approx(5 / 20)


# -- weights rules and method ----------------------------------------------------------------


def test_learnable_pattern_leads_to_weights_sft():
    d = decide(pattern_batch())
    assert d.lever is Lever.weights and d.method == "sft"
    assert d.evidence["rule"] == "learnable_pattern"
    assert d.evidence["focus"] == "near_miss"
    TrainSettings.model_validate(d.settings)  # weights settings go to the trainer as they are


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
    d = decide(pattern_batch(k=4, vary=True), context=LAW.model_copy(update={"samples": 4}))
    assert d.lever is Lever.weights and d.method == "grpo"
    assert TrainSettings.model_validate(d.settings).group_size == 4
    assert "67%" in d.rationale


def test_k_samples_with_variance_lead_to_grpo_in_the_fallback_too():
    weights_only = MSE.model_copy(update={"samples": 4, "levers": ("weights",)})
    d = decide(mse_batch(k=4, vary=True), context=weights_only)
    assert d.lever is Lever.weights and d.evidence["rule"] == "fallback_weights"
    assert d.method == "grpo" and d.settings["group_size"] == 4
    assert "harness lever is off" in d.rationale
    flat = decide(mse_batch(k=4), context=weights_only)
    assert flat.method == "sft"


def test_dpo_follows_an_sft_that_did_not_pay_when_wrong_answers_are_valid():
    sft_lost = [outcome(Lever.weights, False, -0.01, method="sft")]
    d = decide(pattern_batch(), history=sft_lost)
    assert d.lever is Lever.weights and d.method == "dpo"
    assert "SFT's 1 attempts on this run gained -0.01" in d.rationale and "67%" in d.rationale
    TrainSettings.model_validate(d.settings)
    # SFT that paid stays SFT; DPO that did no better than SFT hands back to SFT
    assert (
        decide(pattern_batch(), history=[outcome(Lever.weights, True, 0.02, method="sft")]).method
        == "sft"
    )
    both = [*sft_lost, outcome(Lever.weights, False, -0.03, method="dpo")]
    patient = OfflineFeedbackSettings(lever_patience=5)
    assert decide(pattern_batch(), history=both, settings=patient).method == "sft"
    # too few valid-but-wrong answers: no hard negatives worth pairing
    high = OfflineFeedbackSettings(dpo_wrong_share=0.9)
    assert decide(pattern_batch(), history=sft_lost, settings=high).method == "sft"


def test_ppo_for_a_harness_that_samples_once_sft_did_not_pay_never_for_option_scoring():
    sft_lost = [outcome(Lever.weights, False, -0.01, method="sft")]
    sampling = [t.model_copy(update={"calls": 2, "sampled_tokens": 12}) for t in pattern_batch()]
    d = decide(sampling, history=sft_lost)
    assert d.lever is Lever.weights and d.method == "ppo", d.rationale
    assert "100% of" in d.rationale and "2.0 calls per episode" in d.rationale
    assert "SFT's 1 attempts on this run gained -0.01" in d.rationale
    assert d.evidence["episodes"]["sampling_share"] == 1.0
    TrainSettings.model_validate(d.settings)
    # gold first: before SFT was tried, a sampling harness on a labelled task gets SFT
    assert decide(sampling).method == "sft"
    # the same batch scored by option scoring (no sampled token): DPO, never PPO
    scoring = [t.model_copy(update={"calls": 2, "sampled_tokens": 0}) for t in pattern_batch()]
    assert decide(scoring, history=sft_lost).method == "dpo"
    # a PPO that did not pay either hands back to SFT/DPO
    both = [*sft_lost, outcome(Lever.weights, False, -0.02, method="ppo")]
    patient = OfflineFeedbackSettings(lever_patience=5)
    assert decide(sampling, history=both, settings=patient).method in ("sft", "dpo")


def test_grpo_that_does_not_fit_the_budget_falls_back_to_sft():
    d = decide(pattern_batch(k=4, vary=True), budget=Budget(minutes_left=30))
    assert d.lever is Lever.weights and d.method == "sft"


# -- a lower-is-better task ------------------------------------------------------------------


def test_a_lower_is_better_task_is_never_solved_and_falls_back_to_the_whole_space():
    perfect = [measured(f"p{i}", 0.0) for i in range(20)]  # zero error everywhere
    d = decide(perfect, context=MSE)
    assert d.lever is Lever.harness and d.evidence["rule"] == "fallback_harness"
    assert d.settings == {"focus": None} and d.evidence["accuracy"] is None
    d = decide(mse_batch(), context=MSE)
    assert d.evidence["scores"]["best"] == pytest.approx(-0.1)
    assert "mean mse 0.65" in d.rationale and "lower is better" in d.rationale
    assert "accuracy" not in d.rationale


def test_a_lower_is_better_task_reads_oriented_gains():
    # val_gain is already oriented: the weights lever lowered the error more per minute.
    history = [outcome(Lever.harness, True, 0.01), outcome(Lever.weights, True, 0.05)]
    d = decide(mse_batch(), history=history, context=MSE)
    assert d.lever is Lever.weights and d.evidence["chosen_by"] == "gain_per_minute"


@pytest.mark.parametrize(
    ("context", "batch"), [(MSE, mse_batch), (LAW, pattern_batch)], ids=["program", "options"]
)
def test_a_harness_that_never_calls_the_policy_leaves_the_weights_lever_out(context, batch):
    # batches and a history that choose weights (a measured program task; an options task
    # whose rule fires for weights), but every episode is known to have made no LLM call:
    # training the policy could not change what the harness returns
    history = [outcome(Lever.harness, True, 0.01), outcome(Lever.weights, True, 0.05)]
    asking = [t.model_copy(update={"tokens": 40}) for t in batch()]
    assert decide(asking, history=history, context=context).lever is Lever.weights
    silent = [t.model_copy(update={"tokens": 0}) for t in batch()]
    d = decide(silent, history=history, context=context)
    assert d.lever is Lever.harness and d.evidence["chosen_by"] == "only_feasible"
    assert "weights lever is left out" in d.rationale and "no policy calls" in d.rationale
    only_weights = context.model_copy(update={"levers": ("weights",)})
    stop = decide(silent, history=history, context=only_weights)
    assert stop.lever is Lever.stop and stop.evidence["rule"] == "policy_unused"
    assert decide(asking, history=history, context=only_weights).lever is Lever.weights


# -- choice ----------------------------------------------------------------------------------


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
    ("harness_tries", "weights_tries", "lever", "chosen_by"),
    [
        (2, 1, Lever.weights, "fewer_attempts"),
        (1, 2, Lever.harness, "fewer_attempts"),
        (1, 1, Lever.harness, "tie"),
        (0, 0, Lever.harness, "tie"),
    ],
)
def test_between_fallbacks_the_less_tried_lever_then_the_harness_wins(
    harness_tries, weights_tries, lever, chosen_by
):
    """No rule fires for either lever; past attempts gained nothing (equal gain per minute)."""

    def tries(lever: Lever, k: int) -> list[Outcome]:
        return [outcome(lever, i == 0, 0.0) for i in range(k)]  # accepted once, then rejected

    history = [*tries(Lever.harness, harness_tries), *tries(Lever.weights, weights_tries)]
    d = decide(noise_batch(), history=history)
    assert d.evidence["rule"].startswith("fallback_")
    assert (d.lever, d.evidence["chosen_by"]) == (lever, chosen_by), d.rationale
    if chosen_by == "fewer_attempts":
        assert "tried less so far" in d.rationale
    else:
        assert "full tie" in d.rationale


def test_the_harness_fallback_focuses_a_family_not_tried_recently():
    d = decide(noise_batch())
    assert d.settings == {"focus": "examples"}  # the first declared family
    harness_only = LAW.model_copy(update={"levers": ("harness",)})
    recent = [outcome(Lever.harness, True, 0.01, focus=f) for f in ("examples", "shortlist")]
    d = decide(noise_batch(), history=recent[:1], context=harness_only)
    assert d.settings == {"focus": "shortlist"}
    d = decide(noise_batch(), history=recent, context=harness_only)
    assert d.settings == {"focus": "scoring"}  # two most recent (`recent_focus`) are skipped
    assert "weights lever is off" in d.rationale


def test_after_a_rejected_round_of_every_family_the_whole_space_alternates_with_them():
    harness_only = LAW.model_copy(update={"levers": ("harness",)})
    families = ["examples", "shortlist", "scoring", "format"]
    accepted = [outcome(Lever.harness, True, 0.01, focus="examples")]
    rejected = [outcome(Lever.harness, False, -0.01, focus=f) for f in families]
    d = decide(noise_batch(), history=accepted + rejected[:3], context=harness_only)
    assert d.settings == {"focus": "format"}  # three of four rejected: the one never focused
    d = decide(noise_batch(), history=accepted + rejected, context=harness_only)
    assert d.settings == {"focus": None} and "whole space" in d.rationale
    assert "last 4 harness candidates were all rejected" in d.rationale
    whole = outcome(Lever.harness, False, -0.01)  # the whole-space try was rejected as well
    patient = OfflineFeedbackSettings(max_rejections=12)
    d = decide(
        noise_batch(), history=accepted + rejected + [whole], context=harness_only,
        settings=patient,
    )  # fmt: skip
    assert d.settings["focus"] in families  # and the families get their turn again


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
    empty = History(outcomes=())
    assert agent.decide_before_rollout(empty, PLENTY, LAW, **kw) is None
    spent = agent.decide_before_rollout(empty, Budget(minutes_left=2), LAW, **kw)
    assert spent is not None and spent.lever is Lever.stop
    assert spent.evidence["rule"] == "budget" and "2.0 min left" in spent.rationale
    # the estimate comes from history: a harness attempt that took 1 min fits 2 min left
    quick = History(outcomes=(outcome(Lever.harness, True, 0.01, minutes=1.0),))
    assert agent.decide_before_rollout(quick, Budget(minutes_left=2), LAW, **kw) is None
    # only enabled levers count: SFT (20 min) does not fit 10 min in a weights-only run
    weights_only = LAW.model_copy(update={"levers": ("weights",)})
    assert agent.decide_before_rollout(empty, Budget(minutes_left=10), weights_only, **kw)
    none = agent.decide_before_rollout(empty, PLENTY, LAW.model_copy(update={"levers": ()}), **kw)
    assert none is not None and none.evidence["rule"] == "no_levers"


def test_an_unknown_lever_is_an_error():
    with pytest.raises(ValueError, match="levers"):
        decide(format_batch(), context=LAW.model_copy(update={"levers": ("harness", "stop")}))


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
    assert "7 answers outside the option set, 5 unparsable" in d.rationale
    assert "accuracy 40%" in d.rationale
    assert len(re.findall(r"\d+%", d.rationale)) >= 3
    assert d.evidence["accuracy"] == pytest.approx(0.4)
    assert (d.run_id, d.generation) == ("r", 3)
    assert {"rule", "chosen_by", "focus", "minutes_estimate"} <= d.evidence.keys()
    json.dumps(d.model_dump(mode="json"))


def test_no_trajectories_is_an_error():
    with pytest.raises(ValueError, match="trajectories"):
        decide([])


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


def test_the_agents_name_no_task_field_or_knob():
    agents = Path(__file__).parents[1] / "src" / "sialoop" / "agents"
    for name in ("evidence.py", "feedback.py", "rules.py"):
        text = (agents / name).read_text()
        for word in ('"ranked"', "prior_ranked", '"label"', "PRIOR_WEIGHT", "shortlist"):
            assert word not in text, f"{name} names {word}"


def test_lever_minutes_start_from_config_and_then_follow_the_run():
    from sialoop.agents.registry import feedback_agent
    from sialoop.config import load_config

    cfg = load_config(None, {"task": "toy", "agents.sft_minutes": 4.0, "agents.grpo_minutes": 8.0})
    agent = feedback_agent(cfg)
    guess = agent._minutes(History(outcomes=()))
    assert (guess["sft"], guess["grpo"], guess["harness"]) == (4.0, 8.0, 1.5)
    # one measured SFT attempt of 1.5 min: SFT's cost is that, GRPO's scales with it
    ran = agent._minutes(History(outcomes=(outcome(Lever.weights, False, 0.0, 1.5, "sft"),)))
    assert (ran["sft"], ran["grpo"], ran["harness"]) == (1.5, 3.0, 1.5)


# -- the cost rule ---------------------------------------------------------------------------
def with_cost_family(context: FeedbackContext, source: str) -> FeedbackContext:
    return FeedbackContext(metric=context.metric, declarations=read_declarations(source))


LAW_COST = with_cost_family(
    LAW,
    """
PRIOR_WEIGHT = 30.0
SHORTLIST = 8
LM_MARGIN = 1.0
KNOBS = {
    "SHORTLIST": {"family": "shortlist", "values": [4, 8, 16]},
    "PRIOR_WEIGHT": {"family": "scoring", "values": [0.0, 1.0, 3.0, 10.0, 30.0]},
    "LM_MARGIN": {"family": "cost", "values": [1.0, 0.5, 0.2]},
}
SIGNALS = {
    "ranked": {"kind": "ranking", "family": "shortlist"},
    "prior_ranked": {"kind": "alternative", "family": "scoring", "raises": "PRIOR_WEIGHT",
                     "bound_family": "shortlist"},
}
""",
)
# The second task: majority voting over samples, where fewer samples is the cheaper move.
MATH_COST = with_cost_family(
    MATH,
    """
TEMPERATURE = 0.7
N_SAMPLES = 8
KNOBS = {
    "TEMPERATURE": {"family": "sampling", "float": [0.0, 1.5]},
    "N_SAMPLES": {"family": "cost", "values": [8, 4, 2, 1]},
}
SIGNALS = {"votes": {"kind": "alternative", "family": "sampling"}}
ANSWER = "answer"
""",
)


def test_an_answer_that_is_its_alternative_focuses_the_cost_family():
    """LawBench at v3: the prior decides nearly every answer, so the model's scoring on top of
    it is the cost to cut; without a cost family the old rule (widen the bound) still leads."""
    batch = prior_batch(prior_right=12, answer_follows_prior=True)
    d = decide(batch, context=LAW_COST)
    assert d.lever is Lever.harness and d.evidence["rule"] == "answer_is_alternative"
    assert d.settings == {"focus": "cost"}
    assert "'prior_ranked'" in d.rationale and "100%" in d.rationale
    assert decide(batch).evidence["rule"] == "answer_bound_by_alternative"  # no cost family


def test_a_second_tasks_cost_family_is_focused_when_its_vote_is_the_answer():
    votes = []
    for t in vote_batch():
        answer = t.output["answer"]
        votes.append(t.model_copy(update={"output": {**t.output, "votes": [answer, "x"]}}))
    d = decide(votes, context=MATH_COST)
    assert d.evidence["rule"] == "answer_is_alternative" and d.settings == {"focus": "cost"}
    some = [t.model_copy(update={"output": {**t.output, "votes": ["x"]}}) if i % 3 == 0 else t
            for i, t in enumerate(votes)]  # fmt: skip
    assert decide(some, context=MATH_COST).evidence["rule"] != "answer_is_alternative"  # 65%


def test_a_measurement_task_with_a_cost_family_gets_no_cost_rule_without_a_gold():
    """Agreement with an alternative is measured against gold answers; a lower-is-better
    program task has none, so its cost family is reached only through the search (a `cost`
    signal is declared by the Task API but not read by the agents yet)."""
    context = FeedbackContext(
        metric=MSE.metric,
        declarations=read_declarations(
            'BLOCK = 64\nKNOBS = {"BLOCK": {"family": "cost", "values": [64, 32, 16]}}\n'
            'SIGNALS = {"baseline": {"kind": "alternative", "family": "cost"}}\n'
        ),
    )
    batch = [t.model_copy(update={"output": {**t.output, "baseline": "x"}}) for t in mse_batch()]
    d = decide(batch, context=context)
    assert d.evidence.get("rule") != "answer_is_alternative"
    assert d.evidence["alternatives"] == {}
