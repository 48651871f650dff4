"""Training sets built from the run store, never from rollout code (`sft_examples`,
`grpo_groups`, `dpo_pairs`, `ppo_episodes`, one data path for every method): stored trajectories, the
LLM calls the policy endpoint recorded for them, and the task's train labels.

Gold labels come only from the train split: `sft_examples` refuses any other split, `grpo_groups`
reads train trajectories only, and `Task.label` itself refuses test instances. Val stays a clean
measure of the adapter and test is never touched.

How an option-scoring call is recognised (what `sialoop.harness.kit.score_options` sends and the
endpoint records in `LLMCall.params`): endpoint "completions", a string prompt, `echo` true,
`max_tokens` 0 and an integer `echo_logprobs_from` = len(prefix). Consecutive such calls with the
same prefix form one request; each prompt is prefix + option + suffix. The suffix (e.g. "\\n") is
not recorded, so it is recovered from a known answer (the trajectory's output, else the gold
label) that is one of the options: the shortest s such that some prompt is prefix + answer + s and
every prompt of the request ends with s.

Not covered (such trajectories are skipped and counted in the log): calls without
`echo_logprobs_from` (the prefix is unknown), a per-prompt list of differing offsets, requests
where no known answer is among the options, chat calls, non-string labels.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sialoop.records import LLMCall, Trajectory
from sialoop.store import Store
from sialoop.tasks.base import Instance, Metric, Task
from sialoop.train.base import TrainError, TrainExample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptionSet:
    """One option-scoring request: the options were scored as prefix + option + suffix."""

    prefix: str
    options: tuple[str, ...]
    suffix: str


def answer_text(value: Any) -> str | None:
    """An output or label as option text: a string, or a dict's "label" string."""
    if isinstance(value, dict):
        value = value.get("label")
    return value if isinstance(value, str) else None


def _scoring_offset(call: LLMCall) -> int | None:
    p = call.params
    if call.endpoint != "completions" or not isinstance(call.prompt, str):
        return None
    if p.get("echo") is not True or p.get("max_tokens") != 0:
        return None
    k = p.get("echo_logprobs_from")
    if isinstance(k, list) and k and all(x == k[0] for x in k):
        k = k[0]
    return k if isinstance(k, int) and 0 <= k <= len(call.prompt) else None


@dataclass(frozen=True)
class ScoringRequest:
    """Consecutive option-scoring calls with one prefix; each remainder is option + suffix."""

    prefix: str
    remainders: tuple[str, ...]


def scoring_requests(calls: list[LLMCall]) -> list[ScoringRequest]:
    """The option-scoring requests among `calls`, in call order (repeated options kept once)."""
    found: list[tuple[str, list[str]]] = []
    for call in calls:
        k = _scoring_offset(call)
        if k is None:
            continue
        prompt = str(call.prompt)
        prefix, rest = prompt[:k], prompt[k:]
        if found and found[-1][0] == prefix:
            if rest not in found[-1][1]:
                found[-1][1].append(rest)
        else:
            found.append((prefix, [rest]))
    return [ScoringRequest(prefix, tuple(rests)) for prefix, rests in found]


def option_set(prefix: str, remainders: tuple[str, ...], answers: list[str]) -> OptionSet | None:
    """Splits remainders into options and their shared suffix using answers known to be options."""
    suffixes = {
        r[len(a) :]
        for a in answers
        for r in remainders
        if r.startswith(a) and all(x.endswith(r[len(a) :]) for x in remainders)
    }
    if not suffixes:
        return None
    suffix = min(suffixes, key=len)
    options = tuple(r[: len(r) - len(suffix)] if suffix else r for r in remainders)
    return OptionSet(prefix, options, suffix)


def decisive_set(calls: list[LLMCall], output: str | None, gold: str | None) -> OptionSet | None:
    """The option request that decided the output: the last one whose options include the
    output, else the last one including gold, else the last one whose suffix can be recovered."""
    answers = [a for a in (output, gold) if a]
    requests = scoring_requests(calls)
    sets = [s for r in requests if (s := option_set(r.prefix, r.remainders, answers))]
    for wanted in (output, gold):
        hit = [s for s in sets if wanted in s.options]
        if wanted and hit:
            return hit[-1]
    return sets[-1] if sets else None


def _usable(trajectories: list[Trajectory]) -> list[Trajectory]:
    return [t for t in trajectories if t.score is not None and t.error is None]


def _instances(task: Task) -> dict[str, Instance]:
    return {i.id: i for i in task.instances("train")}


def sft_examples(
    store: Store, task: Task, version_id: str, split: str = "train"
) -> list[TrainExample]:
    """One example per scored train trajectory of `version_id` with option scoring: prompt = the
    decisive request's prefix, completion = gold label + suffix (even when the harness did not
    shortlist gold). Duplicates (several samples of one instance) are kept once.

    Raises TrainError for any split but train: gold labels for training come from train only.
    """
    if split != "train":
        raise TrainError(f"SFT examples come from the train split only, not {split!r}")
    instances, seen, skipped = _instances(task), set(), Counter()
    out: list[TrainExample] = []
    for traj in _usable(store.trajectories(version_id, "train")):
        instance = instances.get(traj.instance_id)
        gold = answer_text(task.label(instance)) if instance else None
        if gold is None:
            skipped["no string label"] += 1
            continue
        calls = store.llm_calls(traj.trajectory_id)
        found = decisive_set(calls, answer_text(traj.output), gold)
        if found is None:
            skipped["no recoverable option scoring"] += 1
            continue
        example = TrainExample(prompt=found.prefix, completion=gold + found.suffix)
        if (example.prompt, example.completion) not in seen:
            seen.add((example.prompt, example.completion))
            out.append(example)
    log.info("sft_examples(%s): %d examples; skipped %s", version_id, len(out), dict(skipped))
    return out


def _option_group(traj: Trajectory, calls: list[LLMCall], gold: str) -> list[TrainExample]:
    found = decisive_set(calls, answer_text(traj.output), gold)
    if found is None:
        return []
    return [
        TrainExample(
            prompt=found.prefix,
            completion=option + found.suffix,
            reward=1.0 if option == gold else 0.0,
            group=traj.trajectory_id,
        )
        for option in found.options
    ]


def _sample_member(
    traj: Trajectory, calls: list[LLMCall], gold: str, group: str, metric: Metric
) -> TrainExample | None:
    """One sampled trajectory as a group member: its chosen option, else its last generation;
    its reward is the score in the metric's direction."""
    output = answer_text(traj.output)
    found = decisive_set(calls, output, gold)
    reward = (metric.oriented(traj.score.value) if traj.score else None) or 0.0
    if found is not None and output in found.options:
        prompt, completion = found.prefix, output + found.suffix
        return TrainExample(prompt=prompt, completion=completion, reward=reward, group=group)
    made = sampled_calls(calls)  # a chat call counts: its prompt ids are the rendered messages
    return _call_example(made[-1], reward, group) if made else None


def _call_example(call: LLMCall, reward: float, group: str) -> TrainExample:
    """A sampled call as the endpoint recorded it: the token ids it saw and sampled (the text
    too, where the prompt was one), and the sampled tokens' logprobs where it returned them."""
    logprobs = call.token_logprobs
    if logprobs is not None:  # echoed prompt first: keep the sampled tokens' part
        logprobs = logprobs[-len(call.completion_token_ids) :]
    known = logprobs is not None and all(v is not None for v in logprobs)
    return TrainExample(
        prompt=call.prompt if isinstance(call.prompt, str) else "",
        completion=call.completion or "?",
        reward=reward,
        group=group,
        prompt_ids=tuple(call.prompt_token_ids),
        completion_ids=tuple(call.completion_token_ids),
        logprobs=tuple(float(v) for v in logprobs or ()) if known else None,
    )


def grpo_groups(store: Store, task: Task, version_id: str) -> list[TrainExample]:
    """GRPO examples from the train trajectories of `version_id`; members of a group share `group`.

    - An instance with several samples (trajectories with different `sample`) is one group: each
      sample's answer (its chosen option + suffix after the prefix, else its last sampled call,
      chat included, as the endpoint recorded its tokens) with the task's score of that
      trajectory as reward.
    - An instance with one trajectory is one group of the options its harness scored: each option
      + suffix after the prefix, reward 1.0 for the gold label and 0.0 for the others.
    Groups without reward variance are returned too; the trainer skips and counts them.
    """
    instances, skipped = _instances(task), Counter()
    by_instance: dict[str, list[Trajectory]] = {}
    for traj in _usable(store.trajectories(version_id, "train")):
        by_instance.setdefault(traj.instance_id, []).append(traj)
    out: list[TrainExample] = []
    for instance_id, trajectories in by_instance.items():
        instance = instances.get(instance_id)
        gold = answer_text(task.label(instance)) if instance else None
        if gold is None:
            skipped["no string label"] += 1
            continue
        if len({t.sample for t in trajectories}) > 1:
            group = f"{version_id}/{instance_id}"
            members = [
                _sample_member(t, store.llm_calls(t.trajectory_id), gold, group, task.metric)
                for t in trajectories
            ]
            out += [m for m in members if m is not None]
            skipped["sample without a usable answer"] += members.count(None)
        else:
            for t in trajectories:
                group_ = _option_group(t, store.llm_calls(t.trajectory_id), gold)
                skipped["no recoverable option scoring"] += not group_
                out += group_
    log.info("grpo_groups(%s): %d examples; skipped %s", version_id, len(out), dict(skipped))
    return out


def _ranked_wrong(output: Any, options: tuple[str, ...], gold: str) -> str | None:
    """The harness's strongest wrong candidate: the first non-gold entry of its `ranked` signal
    (the options in its own order), else its answer when wrong, else the first other option."""
    ranked = output.get("ranked") if isinstance(output, dict) else None
    if isinstance(ranked, list):
        for option in ranked:
            if isinstance(option, str) and option != gold and option in options:
                return option
    answer = answer_text(output)
    if answer is not None and answer != gold and answer in options:
        return answer
    return next((o for o in options if o != gold), None)


def dpo_pairs(store: Store, task: Task, version_id: str) -> list[TrainExample]:
    """DPO pairs from the train trajectories of `version_id`, two examples per pair sharing
    `group` (reward 1.0: chosen, 0.0: rejected), chosen first.

    - An instance with several samples: its best-scored sample is chosen, its worst rejected,
      when their scores differ (each as in `grpo_groups`).
    - An instance with one option-scoring trajectory: gold + suffix is chosen and the harness's
      strongest wrong candidate (a hard negative, `_ranked_wrong`) rejected.
    """
    instances, skipped = _instances(task), Counter()
    by_instance: dict[str, list[Trajectory]] = {}
    for traj in _usable(store.trajectories(version_id, "train")):
        by_instance.setdefault(traj.instance_id, []).append(traj)
    out: list[TrainExample] = []
    for instance_id, trajectories in by_instance.items():
        instance = instances.get(instance_id)
        gold = answer_text(task.label(instance)) if instance else None
        if gold is None:
            skipped["no string label"] += 1
            continue
        group = f"{version_id}/{instance_id}"
        if len({t.sample for t in trajectories}) > 1:
            members = [
                m
                for t in trajectories
                if (
                    m := _sample_member(
                        t, store.llm_calls(t.trajectory_id), gold, group, task.metric
                    )
                )
            ]
            members.sort(key=lambda m: -(m.reward or 0.0))
            if len(members) < 2 or members[0].reward == members[-1].reward:
                skipped["samples without a score gap"] += 1
                continue
            best, worst = members[0], members[-1]
            out += [
                best.model_copy(update={"reward": 1.0}),
                worst.model_copy(update={"reward": 0.0}),
            ]
            continue
        traj = trajectories[0]
        found = decisive_set(store.llm_calls(traj.trajectory_id), answer_text(traj.output), gold)
        wrong = _ranked_wrong(traj.output, found.options, gold) if found else None
        if found is None or wrong is None:
            skipped["no recoverable option scoring"] += 1
            continue
        out += [
            TrainExample(
                prompt=found.prefix, completion=gold + found.suffix, reward=1.0, group=group
            ),
            TrainExample(
                prompt=found.prefix, completion=wrong + found.suffix, reward=0.0, group=group
            ),
        ]
    log.info("dpo_pairs(%s): %d pairs; skipped %s", version_id, len(out) // 2, dict(skipped))
    return out


def sampled_calls(calls: list[LLMCall]) -> list[LLMCall]:
    """The calls that sampled tokens (not option scoring), with the token ids the endpoint
    recorded; a chat call counts, its prompt ids being the rendered messages."""
    return [c for c in calls if c.sampled_tokens]


def ppo_episodes(store: Store, task: Task, version_id: str) -> list[TrainExample]:
    """PPO sequences from the train trajectories of `version_id`: every sampled call of a scored
    episode, as recorded (token ids, and sampling-time logprobs where the harness asked for
    them), with the episode's score in the metric's direction as reward and the episode as
    group. No label is read: the reward is the task's score of the episode."""
    skipped, out = Counter(), []
    for traj in _usable(store.trajectories(version_id, "train")):
        if traj.score is None or traj.score.value is None:
            skipped["no score"] += 1
            continue
        calls = sampled_calls(store.llm_calls(traj.trajectory_id))
        skipped["no sampled call"] += not calls
        reward = task.metric.oriented(traj.score.value)
        out += [_call_example(c, reward, traj.trajectory_id) for c in calls]
    log.info("ppo_episodes(%s): %d sequences; skipped %s", version_id, len(out), dict(skipped))
    return out
