"""A Feedback-Agent plug-in for tests (`agents.feedback = "scripted_agents:weights_at_two"`):
the offline agent, except that generation 2 pulls the weights lever with a `max_len` no
completion fits in, so that every run reaches a failing trainer at a known point. It exercises
the agents registry's `module:attr` path."""

from __future__ import annotations

from typing import Any

from sialoop.agents.registry import FEEDBACK
from sialoop.records import Decision, Lever


class WeightsAtTwo:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def decide_before_rollout(self, *args: Any, **kwargs: Any) -> Decision | None:
        return self.inner.decide_before_rollout(*args, **kwargs)

    def decide(self, *args: Any, **kwargs: Any) -> Decision:
        decision = self.inner.decide(*args, **kwargs)
        if decision.generation != 2:
            return decision
        return decision.model_copy(
            update={
                "lever": Lever.weights,
                "method": "sft",
                "settings": {"max_len": 2},
                "rationale": "scripted: generation 2 trains with max_len 2, which must fail",
            }
        )


def weights_at_two(cfg: Any) -> WeightsAtTwo:
    return WeightsAtTwo(FEEDBACK["offline"](cfg))


class FailsAtThree(WeightsAtTwo):
    """As `WeightsAtTwo`, and the agent itself fails at generation 3."""

    def decide(self, *args: Any, **kwargs: Any) -> Decision:
        if kwargs.get("generation") == 3:
            raise RuntimeError("scripted: the Feedback-Agent fails at generation 3")
        return super().decide(*args, **kwargs)


def fails_at_three(cfg: Any) -> FailsAtThree:
    return FailsAtThree(FEEDBACK["offline"](cfg))


class AlwaysWeights(WeightsAtTwo):
    """The weights lever (SFT) at every generation, whatever the evidence says."""

    def decide(self, *args: Any, **kwargs: Any) -> Decision:
        decision = self.inner.decide(*args, **kwargs)
        return decision.model_copy(
            update={
                "lever": Lever.weights,
                "method": "sft",
                "settings": {},
                "rationale": "scripted: weights at every generation",
            }
        )


def always_weights(cfg: Any) -> AlwaysWeights:
    return AlwaysWeights(FEEDBACK["offline"](cfg))


class PPOAtOne(WeightsAtTwo):
    """PPO at generation 1 (the harness must sample), then the offline agent."""

    def decide(self, *args: Any, **kwargs: Any) -> Decision:
        decision = self.inner.decide(*args, **kwargs)
        if decision.generation != 1:
            return decision
        return decision.model_copy(
            update={
                "lever": Lever.weights,
                "method": "ppo",
                "settings": {},
                "rationale": "scripted: PPO at generation 1",
            }
        )


def ppo_at_one(cfg: Any) -> PPOAtOne:
    return PPOAtOne(FEEDBACK["offline"](cfg))
