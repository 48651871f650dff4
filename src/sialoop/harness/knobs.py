"""What a harness declares about itself: its knobs (typed constants with a domain and a family),
its signals (named fields it returns beside its answer) and where its answer is.

A harness file declares them as module-level literals, read here from the source text with
`ast` (never by importing it: a candidate harness is untrusted code):

    TEMPERATURE = 0.7
    N_SAMPLES = 4
    KNOBS = {
        "TEMPERATURE": {"family": "sampling", "float": [0.0, 1.5]},
        "N_SAMPLES": {"family": "sampling", "int": [1, 16], "log": True},
        "PROMPT": {"family": "prompt", "choices": ["plain", "step_by_step"]},
        "PRIOR_WEIGHT": {"family": "scoring", "values": [0.0, 1.0, 3.0, 10.0]},  # ordered
    }
    SIGNALS = {
        "ranked": {"kind": "ranking", "family": "shortlist"},
        "votes": {"kind": "alternative", "family": "sampling", "raises": "N_SAMPLES"},
    }
    ANSWER = "answer"   # the output dict's key holding the answer (default "label")

Domains: `choices` (unordered), `values` (an ordered ladder), `int` or `float` `[low, high]`
with optional `log` and `step`. Signal kinds: `ranking` (candidates, best first: the gold rank
among them), `alternative` (another answer, or a ranking whose first item is one: how often it
beats the answer), `confidence` (a number per output), `cost` (the harness's own cost, a
number). A signal names the knob `family` it speaks to; an `alternative` may name a knob it
`raises` when it beats the answer, and a `bound_family` to widen when the answer only follows
it. Guaranteed: every knob names an UPPER_CASE module constant bound to a literal inside its
domain; anything else is a `KnobError` naming the knob.
"""

from __future__ import annotations

import ast
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sialoop.errors import SialoopError


class KnobError(SialoopError):
    """A harness's KNOBS or SIGNALS declaration is malformed."""


class Knob(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    family: str
    kind: Literal["choice", "ordered", "int", "float"]
    choices: tuple[Any, ...] = ()  # choice and ordered kinds
    low: float | None = None  # int and float kinds
    high: float | None = None
    log: bool = False
    step: float | None = None

    def contains(self, value: Any) -> bool:
        if self.kind in ("choice", "ordered"):
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        assert self.low is not None and self.high is not None
        return self.low <= value <= self.high

    def neighbours(self, value: Any) -> list[Any]:
        """Values near `value`, nearest first (up before down): the moves one edit makes."""
        if self.kind == "choice":
            return [c for c in self.choices if c != value]
        if self.kind == "ordered":
            if value not in self.choices:
                return list(self.choices)
            i = self.choices.index(value)
            up, down = list(self.choices[i + 1 :]), list(self.choices[:i][::-1])
            return [v for pair in zip(up, down, strict=False) for v in pair] + (
                up[len(down) :] if len(up) > len(down) else down[len(up) :]
            )
        assert self.low is not None and self.high is not None
        out: list[Any] = []
        for direction in (1, -1):
            for k in (1, 2):
                v = self._shift(value, direction * k)
                if v is not None and self.contains(v) and v != value and v not in out:
                    out.append(v)
        return sorted(out, key=lambda v: (abs(self._position(v) - self._position(value)), v < value))

    def _position(self, value: float) -> float:
        if self.log and self.low is not None and self.low > 0:
            return math.log(max(value, self.low))
        return float(value)

    def _shift(self, value: float, steps: int) -> float | None:
        assert self.low is not None and self.high is not None
        if self.log and self.low > 0:
            factor = 2.0 ** steps
            moved = value * factor if value > 0 else self.low
        else:
            step = self.step or ((self.high - self.low) / 8 if self.kind == "float" else 1)
            moved = value + steps * step
        moved = min(max(moved, self.low), self.high)
        if self.kind == "int":
            return int(round(moved))
        return round(float(moved), 6)


class SignalSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    kind: Literal["ranking", "alternative", "confidence", "cost"]
    family: str | None = None
    raises: str | None = None  # a knob to raise when this alternative beats the answer
    bound_family: str | None = None  # the family to widen when the answer only follows it


class Declarations(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    knobs: dict[str, Knob] = Field(default_factory=dict)
    signals: dict[str, SignalSpec] = Field(default_factory=dict)
    answer_key: str = "label"
    values: dict[str, Any] = Field(default_factory=dict)  # each knob's current value

    @property
    def families(self) -> list[str]:
        """Knob families in declaration order."""
        return list(dict.fromkeys(k.family for k in self.knobs.values()))


def _module_literals(tree: ast.Module) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
        ):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def _knob(name: str, spec: Any) -> Knob:
    if not isinstance(spec, dict) or "family" not in spec:
        raise KnobError(f"KNOBS[{name!r}] must be a dict with a 'family' and a domain")
    domain = {k: v for k, v in spec.items() if k not in ("family", "log", "step")}
    fields: dict[str, Any] = {"name": name, "family": spec["family"]}
    fields.update({k: spec[k] for k in ("log", "step") if k in spec})
    if list(domain) == ["choices"] or list(domain) == ["values"]:
        key = next(iter(domain))
        fields.update(kind="choice" if key == "choices" else "ordered", choices=tuple(domain[key]))
    elif list(domain) in (["int"], ["float"]):
        key = next(iter(domain))
        bounds = domain[key]
        if not (isinstance(bounds, list | tuple) and len(bounds) == 2 and bounds[0] < bounds[1]):
            raise KnobError(f"KNOBS[{name!r}]: {key} takes [low, high] with low < high")
        fields.update(kind=key, low=bounds[0], high=bounds[1])
    else:
        raise KnobError(
            f"KNOBS[{name!r}]: give exactly one domain of choices, values, int or float"
        )
    try:
        return Knob(**fields)
    except ValidationError as err:
        raise KnobError(f"KNOBS[{name!r}]: {err.errors()[0]['msg']}") from None


def read_declarations(source: str) -> Declarations:
    """The harness's KNOBS, SIGNALS and ANSWER, checked against its constants."""
    try:
        literals = _module_literals(ast.parse(source))
    except SyntaxError as err:
        raise KnobError(f"the harness does not parse: line {err.lineno}: {err.msg}") from None
    raw_knobs, raw_signals = literals.get("KNOBS", {}), literals.get("SIGNALS", {})
    if not isinstance(raw_knobs, dict) or not isinstance(raw_signals, dict):
        raise KnobError("KNOBS and SIGNALS must be dict literals")
    knobs = {name: _knob(name, spec) for name, spec in raw_knobs.items()}
    values = {}
    for name, knob in knobs.items():
        if not name.isupper() or name not in literals:
            raise KnobError(f"knob {name} is not an UPPER_CASE module constant bound to a literal")
        if not knob.contains(literals[name]):
            raise KnobError(f"knob {name} = {literals[name]!r} is outside its declared domain")
        values[name] = literals[name]
    signals = {}
    for name, spec in raw_signals.items():
        try:
            signals[name] = SignalSpec(name=name, **spec)
        except (TypeError, ValidationError) as err:
            raise KnobError(f"SIGNALS[{name!r}] is malformed: {err}") from None
        raised = signals[name].raises
        if raised is not None and raised not in knobs:
            raise KnobError(f"SIGNALS[{name!r}] raises {raised}, which is not a declared knob")
    answer = literals.get("ANSWER", "label")
    if not isinstance(answer, str):
        raise KnobError("ANSWER must be a string: the output key holding the answer")
    return Declarations(knobs=knobs, signals=signals, answer_key=answer, values=values)
