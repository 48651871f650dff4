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
        "HINTS": {"family": "prompt", "choices": ["none", "terms"],
                  "when": {"PROMPT": ["step_by_step"]}},  # matters only with that prompt
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
domain (for `int`, `float` with a `step`: on the grid `low + k * step`); `log` takes `low > 0`
and no `step`; a knob's `when` ({"OTHER": [values]}: it matters only while OTHER holds one of
them) names other knobs and values in their domains; a signal's `family` and `bound_family`
are declared knob families; anything else is a one-line `KnobError` naming the knob or
signal. Not guaranteed: that a knob's constant is actually used by `solve`, or that every value
of its domain runs.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sialoop.errors import SialoopError

_DOMAINS = ("choices", "values", "int", "float")
_KEYS = frozenset({"family", "log", "step", "when", *_DOMAINS})
UP_SHIFTS = 4  # how many shifts `Knob.upward` looks ahead on an int or float domain


class KnobError(SialoopError):
    """A harness's KNOBS or SIGNALS declaration is malformed."""


def same_value(a: Any, b: Any) -> bool:
    """Equal, and both bools or neither: `True` is not the choice `1`."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _on_grid(offset: float, step: float) -> bool:
    k = offset / step
    return abs(k - round(k)) <= 1e-9 * max(1.0, abs(k))


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
    when: dict[str, tuple[Any, ...]] = Field(default_factory=dict)  # active only on these values

    def active(self, setting: Mapping[str, Any]) -> bool:
        """Whether the knob matters under `setting`: every knob its `when` names holds one of
        the listed values (a knob without `when` always matters)."""
        return all(
            any(same_value(setting.get(name), v) for v in allowed)
            for name, allowed in self.when.items()
        )

    def contains(self, value: Any) -> bool:
        """Whether `value` is in the domain: a member of the choices (bools apart from ints), or
        a number within [low, high] (an int for `int`), on the step grid when there is one."""
        if self.kind in ("choice", "ordered"):
            return any(same_value(value, c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.kind == "int" and not isinstance(value, int):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        return self.step is None or _on_grid(value - self.low, self.step)

    def index(self, value: Any) -> int:
        """The position of `value` among a choice or ordered knob's choices."""
        for i, choice in enumerate(self.choices):
            if same_value(value, choice):
                return i
        raise ValueError(f"{value!r} is not a choice of knob {self.name}")

    def neighbours(self, value: Any) -> list[Any]:
        """Values near `value`, nearest first (up before down): the moves one edit makes."""
        if self.kind == "choice":
            return [c for c in self.choices if not same_value(c, value)]
        if self.kind == "ordered":
            if not self.contains(value):
                return list(self.choices)
            i = self.index(value)
            up, down = list(self.choices[i + 1 :]), list(self.choices[:i][::-1])
            return [v for pair in zip(up, down, strict=False) for v in pair] + (
                up[len(down) :] if len(up) > len(down) else down[len(up) :]
            )
        out: list[Any] = []
        for direction in (1, -1):
            for k in (1, 2):
                v = self._shift(value, direction * k)
                if self.contains(v) and v != value and v not in out:
                    out.append(v)
        return sorted(
            out, key=lambda v: (abs(self._position(v) - self._position(value)), v < value)
        )

    def upward(self, value: Any) -> list[Any]:
        """Values above `value`, nearest first: the rest of an ordered ladder, or up to
        UP_SHIFTS shifts up an int or float domain (doubling on a log scale). A choice knob has
        no order: []."""
        if self.kind == "choice":
            return []
        if self.kind == "ordered":
            return list(self.choices[self.index(value) + 1 :]) if self.contains(value) else []
        out: list[Any] = []
        for k in range(1, UP_SHIFTS + 1):
            v = self._shift(value, k)
            if v > value and self.contains(v) and v not in out:
                out.append(v)
        return out

    def _position(self, value: float) -> float:
        if self.log and self.low is not None and self.low > 0:
            return math.log(max(value, self.low))
        return float(value)

    def _shift(self, value: float, steps: int) -> float:
        assert self.low is not None and self.high is not None
        if self.log and self.low > 0:
            factor = 2.0**steps
            moved = value * factor if value > 0 else self.low
        else:
            step = self.step or ((self.high - self.low) / 8 if self.kind == "float" else 1)
            moved = value + steps * step
        moved = min(max(moved, self.low), self.high)
        if self.kind == "int":
            return round(moved)
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

    def family_knobs(self, family: str) -> list[Knob]:
        """The knobs of `family`, in declaration order."""
        return [k for k in self.knobs.values() if k.family == family]

    def check(self, assignments: Mapping[str, Any]) -> None:
        """A one-line KnobError unless every assignment names a declared knob and lies in its
        domain."""
        for name, value in assignments.items():
            knob = self.knobs.get(name)
            if knob is None:
                raise KnobError(f"{name} is not a declared knob")
            if not knob.contains(value):
                raise KnobError(f"{name} = {value!r} is outside its declared domain")


def _bound_names(node: ast.stmt) -> Iterator[str]:
    """The names a module-level statement binds (assignments, defs, imports)."""
    if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            yield from (n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        yield node.name
    elif isinstance(node, ast.Import | ast.ImportFrom):
        yield from ((a.asname or a.name).split(".")[0] for a in node.names)


def _is_literal(node: ast.expr) -> bool:
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def constant_nodes(tree: ast.Module) -> dict[str, ast.Assign]:
    """Module-level `NAME = <literal>` statements by name, the last binding of each. A name
    whose last module-level binding is anything else (a call, `+=`, an annotation, a def) is
    left out; bindings inside functions, loops or conditionals are not looked at."""
    found: dict[str, ast.Assign] = {}
    for node in tree.body:
        for name in _bound_names(node):
            found.pop(name, None)
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and _is_literal(node.value)
        ):
            found[node.targets[0].id] = node
    return found


def _listed(name: str, family: str, key: str, spec: dict[str, Any]) -> Knob:
    items = spec[key]
    if not isinstance(items, list | tuple) or not items:
        raise KnobError(f"KNOBS[{name!r}]: {key} takes a non-empty list")
    if "log" in spec or "step" in spec:
        raise KnobError(f"KNOBS[{name!r}]: log and step apply to int and float domains only")
    if any(same_value(a, b) for i, a in enumerate(items) for b in items[i + 1 :]):
        raise KnobError(f"KNOBS[{name!r}]: {key} lists a value twice")
    kind = "choice" if key == "choices" else "ordered"
    return Knob(name=name, family=family, kind=kind, choices=tuple(items))


def _ranged(name: str, family: str, key: str, spec: dict[str, Any]) -> Knob:
    number: tuple[type, ...] = (int,) if key == "int" else (int, float)
    what = "integers" if key == "int" else "finite numbers"

    def is_number(x: Any) -> bool:
        return isinstance(x, number) and not isinstance(x, bool) and math.isfinite(x)

    bounds = spec[key]
    if not (
        isinstance(bounds, list | tuple)
        and len(bounds) == 2
        and all(is_number(b) for b in bounds)
        and bounds[0] < bounds[1]
    ):
        raise KnobError(f"KNOBS[{name!r}]: {key} takes [low, high], {what} with low < high")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise KnobError(f"KNOBS[{name!r}]: log takes True or False")
    if log and bounds[0] <= 0:
        raise KnobError(f"KNOBS[{name!r}]: a log domain needs low > 0")
    if step is not None:
        if log:
            raise KnobError(f"KNOBS[{name!r}]: log and step exclude each other")
        if not is_number(step) or step <= 0:
            raise KnobError(f"KNOBS[{name!r}]: step takes a positive number ({what})")
        if not _on_grid(bounds[1] - bounds[0], step):
            raise KnobError(f"KNOBS[{name!r}]: high - low must be a multiple of step")
    return Knob(
        name=name, family=family, kind=key, low=bounds[0], high=bounds[1], log=log, step=step
    )


def _knob(name: Any, spec: Any) -> Knob:
    if not isinstance(name, str):
        raise KnobError(f"KNOBS key {name!r} must be a constant's name")
    if not isinstance(spec, dict):
        raise KnobError(f"KNOBS[{name!r}] must be a dict with a 'family' and one domain")
    unknown = sorted(repr(k) for k in spec if k not in _KEYS)
    if unknown:
        raise KnobError(
            f"KNOBS[{name!r}]: unknown key {unknown[0]} (known: family, choices, values, int,"
            " float, log, step, when)"
        )
    family = spec.get("family")
    if not isinstance(family, str) or not family:
        raise KnobError(f"KNOBS[{name!r}] needs a 'family': a non-empty string")
    domain = [k for k in _DOMAINS if k in spec]
    if len(domain) != 1:
        raise KnobError(
            f"KNOBS[{name!r}]: give exactly one domain of choices, values, int or float"
        )
    listed = domain[0] in ("choices", "values")
    knob = (_listed if listed else _ranged)(name, family, domain[0], spec)
    when = spec.get("when", {})
    if not isinstance(when, dict) or not all(
        isinstance(k, str) and isinstance(v, list | tuple) and v for k, v in when.items()
    ):
        raise KnobError(
            f"KNOBS[{name!r}]: 'when' must map knob names to non-empty lists of their values"
        )
    return knob.model_copy(update={"when": {k: tuple(v) for k, v in when.items()}})


def _signal(name: Any, spec: Any, knobs: dict[str, Knob]) -> SignalSpec:
    if not isinstance(name, str) or not isinstance(spec, dict):
        raise KnobError(f"SIGNALS[{name!r}] must be a dict with a 'kind', keyed by the field name")
    try:
        signal = SignalSpec(name=name, **spec)
    except TypeError as err:
        raise KnobError(f"SIGNALS[{name!r}] is malformed: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise KnobError(f"SIGNALS[{name!r}] is malformed: {where}: {first['msg']}") from None
    if signal.raises is not None and signal.raises not in knobs:
        raise KnobError(f"SIGNALS[{name!r}] raises {signal.raises}, which is not a declared knob")
    families = {k.family for k in knobs.values()}
    for field in ("family", "bound_family"):
        value = getattr(signal, field)
        if value is not None and value not in families:
            raise KnobError(f"SIGNALS[{name!r}]: {field} {value!r} is not a declared knob family")
    return signal


def read_declarations(source: str) -> Declarations:
    """The harness's KNOBS, SIGNALS and ANSWER, checked against its constants. A harness that
    declares no KNOBS has none (an empty `Declarations.knobs`); one that binds KNOBS, SIGNALS
    or ANSWER to anything but a literal is refused."""
    try:
        tree = ast.parse(source)
    except SyntaxError as err:
        raise KnobError(f"the harness does not parse: line {err.lineno}: {err.msg}") from None
    literals = {name: ast.literal_eval(n.value) for name, n in constant_nodes(tree).items()}
    bound = {name for node in tree.body for name in _bound_names(node)}
    for key in ("KNOBS", "SIGNALS", "ANSWER"):
        if key in bound and key not in literals:
            raise KnobError(f"{key} must be bound to a literal at module level")
    raw_knobs, raw_signals = literals.get("KNOBS", {}), literals.get("SIGNALS", {})
    if not isinstance(raw_knobs, dict) or not isinstance(raw_signals, dict):
        raise KnobError("KNOBS and SIGNALS must be dict literals")
    knobs = {name: _knob(name, spec) for name, spec in raw_knobs.items()}
    for knob in knobs.values():
        for other, allowed in knob.when.items():
            if other not in knobs or other == knob.name:
                raise KnobError(f"knob {knob.name}: 'when' names {other}, not another knob")
            outside = [v for v in allowed if not knobs[other].contains(v)]
            if outside:
                raise KnobError(
                    f"knob {knob.name}: 'when' lists {outside[0]!r}, outside {other}'s domain"
                )
    values = {}
    for name, knob in knobs.items():
        if not name.isupper() or name not in literals:
            raise KnobError(f"knob {name} is not an UPPER_CASE module constant bound to a literal")
        if not knob.contains(literals[name]):
            raise KnobError(f"knob {name} = {literals[name]!r} is outside its declared domain")
        values[name] = literals[name]
    signals = {name: _signal(name, spec, knobs) for name, spec in raw_signals.items()}
    answer = literals.get("ANSWER", "label")
    if not isinstance(answer, str):
        raise KnobError("ANSWER must be a string: the output key holding the answer")
    return Declarations(knobs=knobs, signals=signals, answer_key=answer, values=values)
