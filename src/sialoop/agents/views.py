"""What an LLM agent is shown of a run, trimmed to fit a prompt: trajectories (failures first,
their policy calls cut to their ends), the run's past edits, and any JSON (`compact`).

Only what the loop already hands the offline agents goes in: train (or, for a task without
train, val) trajectories and their outputs, train inputs, the run's own versions. Labels are
never copied in, and test is never read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sialoop.agents.base import PastEdit, TrajectoryView
from sialoop.records import Trajectory
from sialoop.store import Store
from sialoop.tasks.base import Metric

TEXT_CAP = 400
CALL_CAP = 300
DIFF_CAP = 1500


def clip(text: str, cap: int, *, tail: bool = False) -> str:
    if len(text) <= cap:
        return text
    return "…" + text[-cap:] if tail else text[:cap] + "…"


def _trimmed(value: Any, cap: int, items: int) -> Any:
    if isinstance(value, str):
        return clip(value, cap)
    if isinstance(value, Mapping):
        pairs = list(value.items())
        out = {str(k): _trimmed(v, cap, items) for k, v in pairs[: items * 4]}
        if len(pairs) > items * 4:
            out["…"] = f"{len(pairs) - items * 4} more keys"
        return out
    if isinstance(value, list | tuple):
        out = [_trimmed(v, cap, items) for v in value[:items]]
        return [*out, f"… {len(value) - items} more"] if len(value) > items else out
    if isinstance(value, float):
        return round(value, 6)
    return value


def compact(value: Any, cap: int = 3000, *, text_cap: int = 200, items: int = 8) -> str:
    """JSON of `value` with long strings and lists cut, then the whole capped at `cap`."""
    return clip(json.dumps(_trimmed(value, text_cap, items), default=str), cap)


def _order(metric: Metric, t: Trajectory) -> tuple[int, float, str, int]:
    """Failures first, then the worst scores in the metric's direction."""
    value = t.score.value if t.score is not None else None
    oriented = metric.oriented(value)
    return (
        0 if t.error is not None else 1 if oriented is None else 2,
        oriented if oriented is not None else 0.0,
        t.instance_id,
        t.sample,
    )


def trajectory_views(
    trajectories: Sequence[Trajectory],
    metric: Metric,
    cap: int,
    *,
    store: Store | None = None,
    inputs: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[TrajectoryView, ...]:
    picked = sorted(trajectories, key=lambda t: _order(metric, t))[:cap]
    views = []
    for t in picked:
        calls: list[dict[str, str]] = []
        if store is not None:
            for call in store.llm_calls(t.trajectory_id)[:2]:
                prompt = call.prompt if isinstance(call.prompt, str) else json.dumps(call.prompt)
                calls.append(
                    {
                        "prompt_end": clip(prompt, CALL_CAP, tail=True),
                        "completion": clip(call.completion, CALL_CAP),
                    }
                )
        error = None if t.error is None else f"{t.error.kind}: {clip(t.error.message, TEXT_CAP)}"
        views.append(
            TrajectoryView(
                instance_id=t.instance_id,
                split=t.split,
                sample=t.sample,
                inputs=compact(inputs.get(t.instance_id, {}), TEXT_CAP) if inputs else "",
                output=compact(t.output, TEXT_CAP),
                score=None if t.score is None else t.score.value,
                correct=None if t.score is None else t.score.correct,
                error=error,
                logs=clip(t.logs, 200, tail=True),
                calls=tuple(calls),
                seconds=round(t.seconds, 3),
                tokens=t.tokens,
            )
        )
    return tuple(views)


def past_edits(store: Store, cap: int) -> tuple[PastEdit, ...]:
    """The run's candidates after generation 0, oldest first, the last `cap` of them."""
    val = {e.version_id: e.value for e in store.evaluations("val") if not e.forced}
    levers = {d.generation: d.lever.value for d in store.decisions()}
    out = []
    for v in store.versions():
        if v.generation == 0:
            continue
        out.append(
            PastEdit(
                version_id=v.version_id,
                parent_id=v.parent_id,
                lever=levers.get(v.generation, "harness"),
                status=v.status,
                val=val.get(v.version_id),
                note=clip(v.note, 300),
                diff=clip(str(v.detail.get("diff", "")), DIFF_CAP),
                error=clip(str(v.detail["error"]), TEXT_CAP) if "error" in v.detail else None,
            )
        )
    return tuple(out[-cap:]) if cap else ()
