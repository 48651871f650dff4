"""The Feedback-Agent and the Meta-Agent by name (`[agents] feedback = ..., meta = ...`).

"offline" is the default (rules over evidence; a search over declared knobs). The name of an
LLM profile (`agents/llm.py` PROFILES: openai, anthropic, openrouter, vllm, llamacpp, ollama) or
a table makes the LLM agent, which records its calls in the run's store and falls back to the
offline agent. A plug-in names its own factory as `package.module:attr`, a callable taking the
run's `RunConfig`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sialoop.errors import ConfigError

if TYPE_CHECKING:
    from sialoop.agents.base import FeedbackAgent, HarnessWriter, MetaAgent
    from sialoop.config import RunConfig
    from sialoop.store import Store


def _offline_feedback(cfg: RunConfig) -> FeedbackAgent:
    from sialoop.agents.feedback import OfflineFeedbackAgent, OfflineFeedbackSettings

    a = cfg.agents  # first guesses of a lever's minutes; measured ones replace them
    settings = OfflineFeedbackSettings(
        lever_patience=cfg.loop.lever_patience,
        harness_minutes=a.harness_minutes,
        sft_minutes=a.sft_minutes,
        grpo_minutes=a.grpo_minutes,
        max_rejections=a.max_rejections,
    )
    return OfflineFeedbackAgent(settings)


def _offline_meta(cfg: RunConfig) -> MetaAgent:
    from sialoop.agents.meta import OfflineMetaAgent

    return OfflineMetaAgent(seed=cfg.seed)


FEEDBACK: dict[str, Callable[[Any], Any]] = {"offline": _offline_feedback}
META: dict[str, Callable[[Any], Any]] = {"offline": _offline_meta}


def _factory(kind: str, name: str, known: dict[str, Callable[[Any], Any]]) -> Callable[[Any], Any]:
    if name in known:
        return known[name]
    if ":" in name:
        module, attr = name.rsplit(":", 1)
        try:
            found = getattr(importlib.import_module(module), attr, None)
        except ImportError as err:
            raise ConfigError(f"agents.{kind} '{name}': {err}") from None
        if callable(found):
            return found
    from sialoop.agents.llm import PROFILES

    raise ConfigError(
        f"agents.{kind} '{name}' is unknown: use one of {', '.join([*known, *PROFILES])} or "
        "package.module:attr"
    )


def _client(cfg: RunConfig, role: str, store: Store | None) -> Any:
    from sialoop.agents.llm import AgentBudget, LLMClient, endpoint_for

    spec = cfg.agents.feedback if role == "feedback" else cfg.agents.meta
    return LLMClient(endpoint_for(spec, role), store, AgentBudget(cfg.agents, store))


def feedback_agent(cfg: RunConfig, store: Store | None = None) -> FeedbackAgent:
    from sialoop.agents.llm import is_llm

    spec = cfg.agents.feedback
    if is_llm(spec):
        from sialoop.agents.llm_feedback import LLMFeedbackAgent

        offline = _offline_feedback(cfg)
        client = _client(cfg, "feedback", store)
        return LLMFeedbackAgent(client, offline, sample=cfg.agents.sample_trajectories)
    assert isinstance(spec, str)
    return _factory("feedback", spec, FEEDBACK)(cfg)


def meta_agent(cfg: RunConfig, store: Store | None = None) -> MetaAgent | HarnessWriter:
    from sialoop.agents.llm import is_llm

    spec = cfg.agents.meta
    if is_llm(spec):
        from sialoop.agents.llm_meta import LLMMetaAgent

        return LLMMetaAgent(_client(cfg, "meta", store), _offline_meta(cfg))
    assert isinstance(spec, str)
    return _factory("meta", spec, META)(cfg)


def agent_endpoints(cfg: RunConfig) -> list[Any]:
    """The LLM endpoints the config names (none for offline or plug-in agents)."""
    from sialoop.agents.llm import endpoint_for, is_llm

    return [
        endpoint_for(spec, role)
        for role, spec in (("feedback", cfg.agents.feedback), ("meta", cfg.agents.meta))
        if is_llm(spec)
    ]
