"""The LLM Feedback-Agent: a model reads the offline agent's evidence numbers, sampled
trajectories and the run's history, and returns a Decision as JSON (schema `DecisionReply`,
sent as structured output where the provider takes it).

An answer is invalid when it is not that JSON, pulls a lever or method that is not available,
names a knob family the harness does not declare, sets a trainer setting the trainer does not
take, or has a rationale that cites no number or a number that is not in its input
(`agents/citations.py`). An invalid answer goes back once with its error; a second invalid
answer, or no answer at all (`LLMUnavailable`: errors after retries, a spent budget), leaves
the generation to the offline agent, whose Decision says so in its rationale and evidence.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sialoop.agents.base import Budget, FeedbackContext, History
from sialoop.agents.citations import quoted_numbers, uncited
from sialoop.agents.feedback import OfflineFeedbackAgent
from sialoop.agents.llm import LLMClient, LLMUnavailable
from sialoop.agents.prompts import feedback_prompt, metric_line, trajectories_text
from sialoop.agents.views import compact, trajectory_views
from sialoop.records import Decision, Lever, Trajectory
from sialoop.train import METHODS

_METHOD_TEXT = {
    "sft": "sft: supervised fine-tuning on the batch's best-scored completions (or gold)",
    "grpo": "grpo: group-relative policy optimisation on k sampled completions per instance",
    "dpo": "dpo: preference pairs (gold or the best sample over the strongest wrong answer)",
    "ppo": "ppo: clipped PPO with a value head and GAE on the sampled calls of each episode "
    "(needs a harness that samples tokens; not option scoring)",
}


class TrainerOverrides(BaseModel):
    """What a Decision may set for the trainer (the rest stays the run's config)."""

    model_config = ConfigDict(extra="forbid")
    lr: float | None = Field(default=None, gt=0, lt=1)
    max_steps: int | None = Field(default=None, ge=1, le=10000)
    batch_size: int | None = Field(default=None, ge=1, le=256)
    max_len: int | None = Field(default=None, ge=16, le=32768)
    beta: float | None = Field(default=None, gt=0, le=10)  # dpo
    kl_coef: float | None = Field(default=None, ge=0, le=10)  # grpo, ppo
    gamma: float | None = Field(default=None, ge=0, le=1)  # ppo
    lam: float | None = Field(default=None, ge=0, le=1)  # ppo
    clip: float | None = Field(default=None, gt=0, lt=1)  # ppo


class DecisionReply(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lever: Literal["harness", "weights", "stop"]
    rationale: str = Field(min_length=1)
    method: str | None = None
    focus: str | None = None
    settings: TrainerOverrides = TrainerOverrides()


class InvalidReply(ValueError):
    pass


def _json_object(text: str) -> Any:
    fenced = re.search(r"```(?:json)?\s*\n(.*?)```", text, re.DOTALL)
    body = fenced.group(1) if fenced else text
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        raise InvalidReply("the answer holds no JSON object")
    try:
        return json.loads(body[start : end + 1])
    except json.JSONDecodeError as err:
        raise InvalidReply(f"the answer is not valid JSON ({err.msg} at char {err.pos})") from None


class LLMFeedbackAgent:
    def __init__(self, client: LLMClient, offline: OfflineFeedbackAgent, *, sample: int) -> None:
        self.client, self.offline, self.sample = client, offline, sample
        self.label = f"llm ({client.endpoint.label()})"

    def decide_before_rollout(
        self, history: History, budget: Budget, context: FeedbackContext, *, run_id: str,
        generation: int,
    ) -> Decision | None:  # fmt: skip
        return self.offline.decide_before_rollout(
            history, budget, context, run_id=run_id, generation=generation
        )

    def decide(
        self, trajectories: Sequence[Trajectory], history: History, budget: Budget,
        context: FeedbackContext, *, run_id: str, generation: int,
    ) -> Decision:  # fmt: skip
        base = self.offline.decide(
            trajectories, history, budget, context, run_id=run_id, generation=generation
        )
        levers = self._available(base, context)
        system, user = self._prompt(trajectories, history, budget, context, base, levers)
        messages: list[dict[str, Any]] = [{"role": "user", "content": user}]
        reason = ""
        for purpose in ("decide", "retry"):
            try:
                text = self.client.chat(
                    system, list(messages), purpose=purpose, generation=generation,
                    schema=DecisionReply.model_json_schema(),
                )  # fmt: skip
            except LLMUnavailable as err:
                reason = str(err)
                break
            try:
                return self._decision(text, user, base, levers, context)
            except InvalidReply as err:
                reason = f"invalid answer: {err}"
                messages += [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"Refused: {err}. Answer again, JSON only."},
                ]
        return base.model_copy(
            update={
                "rationale": f"The LLM Feedback-Agent gave no usable decision ({reason[:300]}); "
                f"the offline rules decide. {base.rationale}",
                "evidence": {**base.evidence, "agent": "offline (fallback)", "llm_error": reason},
            }
        )

    # -- the prompt ---------------------------------------------------------------------------

    def _available(self, base: Decision, context: FeedbackContext) -> dict[str, str]:
        """Lever -> why it is available now (or, as `off:`, why not)."""
        out = {}
        tokens = base.evidence.get("tokens_per_item")
        for name in ("harness", "weights"):
            if name in context.unavailable:
                out[name] = f"off: {context.unavailable[name]}"
            elif name not in context.levers:
                out[name] = "off: this run does not enable it"
            elif name == "weights" and tokens == 0:
                out[name] = "off: the harness made no policy call (0 tokens per item)"
            else:
                out[name] = "available"
        out["stop"] = "available"
        return out

    def _prompt(
        self, trajectories: Sequence[Trajectory], history: History, budget: Budget,
        context: FeedbackContext, base: Decision, levers: dict[str, str],
    ) -> tuple[str, str]:  # fmt: skip
        views = trajectory_views(trajectories, context.metric, self.sample, store=self.client.store)
        past = [
            {
                "generation": o.decision.generation,
                "lever": o.decision.lever.value,
                "method": o.decision.method,
                "accepted": o.accepted,
                "val_gain": o.val_gain,
                "minutes": round(o.minutes, 2),
            }
            for o in history.outcomes
        ]
        families = context.declarations.families
        methods = [
            _METHOD_TEXT.get(m, m) + (f" (group size {context.samples})" if m == "grpo" else "")
            for m in METHODS
        ]
        offline = {
            "lever": base.lever.value,
            "method": base.method,
            "focus": base.settings.get("focus"),
            "rationale": base.rationale,
        }
        evidence = {
            k: v for k, v in base.evidence.items() if k not in ("rule", "chosen_by", "focus")
        }
        return feedback_prompt(
            generation=base.generation,
            metric=metric_line(context.metric),
            levers="\n".join(f"- {k}: {v}" for k, v in levers.items()),
            methods="\n".join(f"- {m}" for m in methods),
            families=", ".join(families) if families else "(none declared: focus null)",
            budget=f"{budget.minutes_left:.1f} minutes left"
            + (
                f", {budget.generations_left} generations left"
                if budget.generations_left is not None
                else ""
            ),
            evidence=compact(evidence, 5000),
            offline=compact(offline, 1500, text_cap=1200),
            history=compact(past, 2000) if past else "(none yet)",
            n_shown=len(views),
            n_total=len(trajectories),
            trajectories=trajectories_text(views),
        )

    # -- the answer ---------------------------------------------------------------------------

    def _decision(
        self, text: str, given: str, base: Decision, levers: dict[str, str],
        context: FeedbackContext,
    ) -> Decision:  # fmt: skip
        try:
            reply = DecisionReply.model_validate(_json_object(text))
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "answer"
            raise InvalidReply(f"{where}: {first['msg']}") from None
        if levers.get(reply.lever, "off").startswith("off"):
            raise InvalidReply(f"lever {reply.lever!r} is not available ({levers[reply.lever]})")
        quoted = uncited(reply.rationale, given)
        if quoted:
            raise InvalidReply(
                f"the rationale cites {', '.join(quoted[:5])}, which the input does not hold"
            )
        if not quoted_numbers(reply.rationale):
            raise InvalidReply("the rationale cites no number of the evidence")
        method, settings = None, {}
        if reply.lever == "weights":
            method = reply.method or "sft"
            if method not in METHODS:
                raise InvalidReply(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")
            if method == "grpo" and context.samples < 2:
                raise InvalidReply("grpo needs k >= 2 samples per instance; this run samples 1")
            sampling = (base.evidence.get("episodes") or {}).get("sampling_share")
            if method in ("grpo", "ppo") and sampling == 0:
                raise InvalidReply(
                    f"{method} learns from sampled tokens and no episode of the batch sampled "
                    "any (the harness scores options): use sft or dpo"
                )
            offline = self.offline.settings
            settings = dict(
                {
                    "grpo": offline.grpo_settings,
                    "dpo": offline.dpo_settings,
                    "ppo": offline.ppo_settings,
                }.get(method, offline.sft_settings)
            )
            settings.update(reply.settings.model_dump(exclude_none=True))
            if method == "grpo":
                settings["group_size"] = context.samples
        elif reply.lever == "harness":
            families = context.declarations.families
            if reply.focus is not None and reply.focus not in families:
                raise InvalidReply(
                    f"focus {reply.focus!r} is not a declared knob family "
                    f"({', '.join(families) or 'none'}); use one or null"
                )
            settings = {"focus": reply.focus}
        return Decision(
            run_id=base.run_id,
            generation=base.generation,
            lever=Lever(reply.lever),
            rationale=reply.rationale,
            evidence={
                **base.evidence,
                "rule": "llm",
                "chosen_by": "llm",
                "focus": reply.focus,
                "agent": self.label,
                "offline_choice": {"lever": base.lever.value, "method": base.method},
            },
            method=method,
            settings=settings,
        )
