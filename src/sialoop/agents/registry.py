"""The Feedback-Agent and the Meta-Agent by name (`[agents] feedback = ..., meta = ...`).

"offline" is the default (rules over evidence; a search over declared knobs). A plug-in names
its own factory as `package.module:attr`, a callable taking the run's `RunConfig`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sialoop.errors import ConfigError

if TYPE_CHECKING:
    from sialoop.agents.base import FeedbackAgent, MetaAgent
    from sialoop.config import RunConfig


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
    raise ConfigError(
        f"agents.{kind} '{name}' is unknown: use one of {', '.join(known)} or package.module:attr"
    )


def feedback_agent(cfg: RunConfig) -> FeedbackAgent:
    return _factory("feedback", cfg.agents.feedback, FEEDBACK)(cfg)


def meta_agent(cfg: RunConfig) -> MetaAgent:
    return _factory("meta", cfg.agents.meta, META)(cfg)
