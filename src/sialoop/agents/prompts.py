"""The LLM agents' prompts: template files in `agents/prompts/` (locked by a golden test),
filled with `string.Template` from the agents' requests."""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from string import Template
from typing import Any

from sialoop.agents.base import EditRequest, PastEdit, TrajectoryView
from sialoop.agents.views import clip, compact
from sialoop.tasks.base import Metric

SPEC_CAP = 4000
SOURCE_CAP = 24000
EVIDENCE_CAP = 4000


def template(name: str) -> str:
    return resources.files("sialoop.agents").joinpath(f"prompts/{name}.md").read_text()


def _fill(name: str, **values: Any) -> str:
    return Template(template(name)).substitute({k: str(v) for k, v in values.items()})


def metric_line(metric: Metric) -> str:
    line = f"{metric.name}, {metric.direction} is better"
    if metric.correct is not None:
        line += f"; correct means: {metric.correct}"
    return line


def _score(value: float | None) -> str:
    return "not scored" if value is None else f"{value:.6g}"


def trajectories_text(views: Sequence[TrajectoryView]) -> str:
    if not views:
        return "(none)"
    return "\n".join(json.dumps(v.model_dump(exclude={"schema_version"})) for v in views)


def edits_text(edits: Sequence[PastEdit]) -> str:
    if not edits:
        return "(none yet)"
    blocks = []
    for e in edits:
        head = (
            f"## {e.version_id} (parent {e.parent_id}, {e.lever}): {e.status}, val {_score(e.val)}"
        )
        body = [head, f"why: {e.note}" if e.note else ""]
        if e.error:
            body.append(f"error: {e.error}")
        if e.diff:
            body.append("```diff\n" + e.diff.rstrip() + "\n```")
        blocks.append("\n".join(b for b in body if b))
    return "\n\n".join(blocks)


def meta_prompt(request: EditRequest) -> tuple[str, str]:
    """(system, user) for the Meta-Agent."""
    d = request.decision
    evidence = {k: v for k, v in d.evidence.items() if k not in ("error", "traceback")}
    user = _fill(
        "meta_user",
        task_spec=clip(request.task_spec, SPEC_CAP),
        metric=metric_line(request.metric),
        parent_id=request.parent_id,
        parent_val=_score(request.parent_val),
        source=clip(request.source, SOURCE_CAP),
        generation=request.generation,
        rationale=d.rationale,
        focus=d.settings.get("focus") or "any part of the harness",
        evidence=compact(evidence, EVIDENCE_CAP),
        n_shown=len(request.trajectories),
        n_total=request.n_trajectories,
        trajectories=trajectories_text(request.trajectories),
        edits=edits_text(request.edits),
    )
    return template("meta_system").strip(), user


def repair_message(error: str) -> str:
    return (
        f"The edit failed: {clip(error, 1500)}\n\nAnswer again in the same format, against the "
        "original harness above (not your previous edit): a first line `WHY: ...`, then "
        "SEARCH/REPLACE blocks or the whole file in one ```python block."
    )


def feedback_prompt(**values: Any) -> tuple[str, str]:
    """(system, user) for the Feedback-Agent; the values are already text."""
    return template("feedback_system").strip(), _fill("feedback_user", **values)
