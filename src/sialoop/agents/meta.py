"""The offline Meta-Agent: a search over the knobs a harness declares about itself.

It knows no task and no template: it reads the parent harness's KNOBS with
`read_declarations` and proposes new values for some of them, in this order:

1. **focus** — the knob family the Decision's `focus` names. When `raise` names a knob, that
   knob first goes up its domain one rung, or two rungs first and then one when `gap` is at
   least BIG_GAP; then each knob of the family in declaration order, its
   `Knob.neighbours` in order. Once the focus family has had ROTATE_AFTER more tries on this
   parent than another family, the less-tried families' moves come first.
2. **optuna** — Optuna's TPE sampler over the whole declared space, seeded from the agent's
   seed, the parent and the length of the history, with every tried setting of the run added
   as a trial: a scored one as COMPLETE with its oriented val score, one whose score is None
   (broken, or never scored) as FAILED, which TPE leaves out of its model. A value outside the
   parent's current domain (or a knob the entry lacks) is dropped from that trial; a trial
   with no value left is not added. The first of TPE_SAMPLES samples that is new is taken.
3. **neighbour** — the nearest single-knob moves over all families: every knob's first
   neighbour, then every knob's second, and so on.

Guaranteed (settings compared in the knobs that matter under the proposal: a knob whose
`when` does not hold there changes nothing): a proposal never repeats a setting tried on this
parent (a history entry with this `parent_id`; a knob missing from an entry's values counts as
the parent's value) nor the parent's own setting; every value lies in its knob's domain; the
same source, Decision, history, parent and seed give the same proposal. Among the allowed
moves, one whose full setting the run has not tried under any parent is preferred; one it has
is proposed only when no other is left, and its `why` says so. Not guaranteed: that None means the space is
exhausted (only that no search above found a new setting), or that a proposed value runs.
"""

from __future__ import annotations

import math
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING, Any, Literal

from sialoop.agents.base import Proposal, TriedSetting
from sialoop.harness.knobs import Declarations, Knob, read_declarations, same_value
from sialoop.harness.operators import apply_assignments
from sialoop.records import Decision

if TYPE_CHECKING:
    import optuna

ROTATE_AFTER = 2  # tries of the focus family on a parent, beyond another's, before it leads
BIG_GAP = 0.3  # a `gap` at least this large skips a rung when raising a knob
TPE_SAMPLES = 16  # samples drawn from TPE before the neighbour moves take over
TPE_STARTUP = 4  # trials TPE samples at random before it models the scores

Search = Literal["focus", "optuna", "neighbour"]


@dataclass(frozen=True)
class _Move:
    """A candidate edit: the changed knobs only, the search that made it and its account."""

    assignments: dict[str, Any]
    search: Search
    how: str


@dataclass(frozen=True)
class _Steer:
    """What the Decision asks for, checked against the declarations."""

    focus: str | None
    raise_knob: str | None
    gap: float
    notes: tuple[str, ...]


def _same(a: Mapping[str, Any], b: Mapping[str, Any], names: Sequence[str]) -> bool:
    return all(n in a and n in b and same_value(a[n], b[n]) for n in names)


class _Parent:
    """The parent harness's knobs, their current values, and what the run has tried."""

    def __init__(self, decl: Declarations, history: Sequence[TriedSetting], parent_id: str):
        self.decl = decl
        self.names = list(decl.knobs)
        self.values = dict(decl.values)
        self.here = [
            {n: h.values.get(n, self.values[n]) for n in self.names}
            for h in history
            if h.parent_id == parent_id
        ]
        self.seen = [h.values for h in history]

    def setting(self, assignments: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.values, **assignments}

    def changes(self, setting: Mapping[str, Any]) -> dict[str, Any]:
        """The knobs `setting` sets to another value than the parent's."""
        return {n: setting[n] for n in self.names if not same_value(setting[n], self.values[n])}

    def active(self, setting: Mapping[str, Any]) -> list[str]:
        """The knobs that matter under `setting` (its `when` conditions hold)."""
        return [n for n in self.names if self.decl.knobs[n].active(setting)]

    def new_here(self, setting: Mapping[str, Any]) -> bool:
        """Not the parent's setting nor one tried on it, in the knobs that matter under it (a
        move of a knob that does not matter there changes nothing)."""
        live = self.active(setting)
        return not _same(setting, self.values, live) and not any(
            _same(setting, tried, live) for tried in self.here
        )

    def new_in_run(self, setting: Mapping[str, Any]) -> bool:
        live = self.active(setting)
        return not any(_same(setting, tried, live) for tried in self.seen)

    def family_tries(self) -> Counter[str]:
        """How many settings tried on this parent changed a knob of each family."""
        tries: Counter[str] = Counter()
        for tried in self.here:
            tries.update({self.decl.knobs[n].family for n in self.changes(tried)})
        return tries


def _steer(decision: Decision, decl: Declarations) -> _Steer:
    """The Decision's `focus`, `raise` and `gap`. A focus or raise the harness does not declare
    is set aside with a note (it reaches the proposal's `why`); a gap that is not a number in
    [0, 1] is a ValueError."""
    settings, notes = decision.settings, []
    focus = settings.get("focus")
    if focus is not None and not (isinstance(focus, str) and focus in decl.families):
        notes.append(f"focus {focus!r} names no declared family")
        focus = None
    raise_knob = settings.get("raise")
    if raise_knob is not None and not (isinstance(raise_knob, str) and raise_knob in decl.knobs):
        notes.append(f"raise {raise_knob!r} names no declared knob")
        raise_knob = None
    gap = settings.get("gap")
    gap = 0.0 if gap is None else gap
    if isinstance(gap, bool) or not isinstance(gap, int | float) or not 0.0 <= gap <= 1.0:
        raise ValueError(f"decision setting gap={gap!r} is not a number in [0, 1]")
    return _Steer(focus, raise_knob, float(gap), tuple(notes))


def _family_order(decl: Declarations, focus: str | None, tries: Counter[str]) -> list[str]:
    """Families by tries on the parent, the focus counted ROTATE_AFTER - 1 fewer and first
    among equals; otherwise in declaration order."""
    return sorted(
        decl.families,
        key=lambda f: (tries[f] - (f == focus) * (ROTATE_AFTER - 1), f != focus),
    )


def _raise_moves(parent: _Parent, steer: _Steer) -> Iterator[_Move]:
    if steer.raise_knob is None:
        return
    knob = parent.decl.knobs[steer.raise_knob]
    up = knob.upward(parent.values[knob.name])[:2]
    skip = steer.gap >= BIG_GAP and len(up) == 2
    picks = up[::-1] if skip else up
    for i, value in enumerate(picks):
        rung = ": one rung skipped" if skip and i == 0 else ""
        sign = ">=" if steer.gap >= BIG_GAP else "<"
        focus = f"focus {steer.focus}, " if steer.focus else ""
        how = f"{focus}raise {knob.name} (gap {steer.gap:.2f} {sign} {BIG_GAP}{rung})"
        yield _Move({knob.name: value}, "focus", how)


def _family_moves(parent: _Parent, family: str, search: Search, how: str) -> Iterator[_Move]:
    for knob in parent.decl.family_knobs(family):
        for value in knob.neighbours(parent.values[knob.name]):
            yield _Move({knob.name: value}, search, f"{how}, neighbour of {knob.name}")


def _focus_moves(parent: _Parent, steer: _Steer) -> Iterator[_Move]:
    """The raise moves and the focus family's moves, after those of families the focus has
    out-tried on this parent."""
    if steer.focus is None:
        yield from _raise_moves(parent, steer)
        return
    tries = parent.family_tries()
    order = _family_order(parent.decl, steer.focus, tries)
    for family in order[: order.index(steer.focus) + 1]:
        if family == steer.focus:
            yield from _raise_moves(parent, steer)
            yield from _family_moves(parent, family, "focus", f"focus {family}")
        else:
            how = (
                f"rotated from focus {steer.focus} ({tries[steer.focus]} tries on this parent)"
                f" to {family} ({tries[family]})"
            )
            yield from _family_moves(parent, family, "neighbour", how)


def _neighbour_moves(parent: _Parent) -> Iterator[_Move]:
    """Every knob's nearest neighbour, then every knob's second nearest, and so on."""
    lists = {n: k.neighbours(parent.values[n]) for n, k in parent.decl.knobs.items()}
    for rank in range(max((len(v) for v in lists.values()), default=0)):
        for name, values in lists.items():
            if rank < len(values):
                how = f"nearest untried single-knob move (rank {rank + 1} of {name})"
                yield _Move({name: values[rank]}, "neighbour", how)


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's INFO logs and experimental warnings silenced for the block, then restored."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


def _distribution(knob: Knob) -> optuna.distributions.BaseDistribution:
    """A knob's Optuna distribution; choice and ordered knobs by the index of their value."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    if knob.kind in ("choice", "ordered"):
        return CategoricalDistribution(tuple(range(len(knob.choices))))
    assert knob.low is not None and knob.high is not None
    if knob.kind == "int":
        step = int(knob.step or 1)
        return IntDistribution(int(knob.low), int(knob.high), log=knob.log, step=step)
    return FloatDistribution(knob.low, knob.high, log=knob.log, step=knob.step)


def _internal(knob: Knob, value: Any) -> Any:
    return knob.index(value) if knob.kind in ("choice", "ordered") else value


def _external(knob: Knob, sampled: Any) -> Any:
    """A sampled parameter as the knob's value: the choice, an int, or a float kept to four
    significant digits (on the step grid when there is one) and clamped to the domain."""
    if knob.kind in ("choice", "ordered"):
        return knob.choices[int(sampled)]
    if knob.kind == "int":
        return int(sampled)
    assert knob.low is not None and knob.high is not None
    if knob.step is not None:
        value = round(knob.low + round((sampled - knob.low) / knob.step) * knob.step, 10)
    else:
        value = float(f"{float(sampled):.4g}")
    return min(max(value, knob.low), knob.high)


def _trial(
    decl: Declarations,
    dists: dict[str, optuna.distributions.BaseDistribution],
    entry: TriedSetting,
) -> optuna.trial.FrozenTrial | None:
    import optuna

    params = {
        n: _internal(k, entry.values[n])
        for n, k in decl.knobs.items()
        if n in entry.values and k.contains(entry.values[n])
    }
    if not params:
        return None
    score = entry.oriented_score
    scored = score is not None and math.isfinite(score)
    return optuna.trial.create_trial(
        params=params,
        distributions={n: dists[n] for n in params},
        value=score if scored else None,
        state=optuna.trial.TrialState.COMPLETE if scored else optuna.trial.TrialState.FAIL,
    )


def _tpe_moves(parent: _Parent, history: Sequence[TriedSetting], seed: int) -> Iterator[_Move]:
    """TPE_SAMPLES samples of a TPE study seeded with the run's tried settings."""
    import optuna

    decl = parent.decl
    with _quiet_optuna():
        dists = {n: _distribution(k) for n, k in decl.knobs.items()}
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=TPE_STARTUP)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        trials = [t for t in (_trial(decl, dists, h) for h in history) if t is not None]
        study.add_trials(trials)
        samples = [study.ask(fixed_distributions=dists).params for _ in range(TPE_SAMPLES)]
    failed = sum(t.state == optuna.trial.TrialState.FAIL for t in trials)
    for i, params in enumerate(samples):
        setting = {n: _external(decl.knobs[n], params[n]) for n in decl.knobs}
        how = (
            f"optuna TPE sample {i + 1} of {TPE_SAMPLES}, seeded with {len(trials)} trials"
            f" ({len(trials) - failed} scored, {failed} failed)"
        )
        yield _Move(parent.changes(setting), "optuna", how)


def _pick(parent: _Parent, moves: Iterator[_Move]) -> tuple[_Move, bool] | None:
    """The first allowed move whose setting is new to the run, else the first allowed one
    (flagged False); an allowed move is non-empty, in domain and new on this parent."""
    fallback = None
    for move in moves:
        if not move.assignments or not all(
            parent.decl.knobs[n].contains(v) for n, v in move.assignments.items()
        ):
            continue
        setting = parent.setting(move.assignments)
        if not parent.new_here(setting):
            continue
        if parent.new_in_run(setting):
            return move, True
        fallback = fallback or move
    return None if fallback is None else (fallback, False)


def _proposal(parent: _Parent, move: _Move, fresh: bool, steer: _Steer) -> Proposal:
    changes = ", ".join(f"{n} {parent.values[n]!r} → {v!r}" for n, v in move.assignments.items())
    notes = list(steer.notes)
    if not fresh:
        notes.append("the run scored this setting under another parent: nothing new was left")
    why = f"{changes}: {move.how}" + "".join(f"; {note}" for note in notes)
    families = {parent.decl.knobs[n].family for n in move.assignments}
    family = families.pop() if len(families) == 1 else None
    return Proposal(assignments=move.assignments, why=why, family=family, search=move.search)


def _seed(seed: int, parent_id: str, history: Sequence[TriedSetting]) -> int:
    return zlib.crc32(f"{seed}|{parent_id}|{len(history)}".encode())


class OfflineMetaAgent:
    """The MetaAgent that searches the declared knobs (focus, then optuna, then neighbours).
    `seed` makes the Optuna search repeatable: give it the run's seed."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def propose(
        self,
        source: str,
        decision: Decision,
        history: Sequence[TriedSetting],
        parent_id: str,
    ) -> Proposal | None:
        """A new setting of the parent `source`'s declared knobs, or None when the harness
        declares none or no search finds a new one. A malformed declaration raises KnobError;
        a malformed `gap` a ValueError."""
        decl = read_declarations(source)
        if not decl.knobs:
            return None
        steer = _steer(decision, decl)
        parent = _Parent(decl, history, parent_id)
        moves = chain(
            _focus_moves(parent, steer),
            _tpe_moves(parent, history, _seed(self.seed, parent_id, history)),
            _neighbour_moves(parent),
        )
        picked = _pick(parent, moves)
        return None if picked is None else _proposal(parent, *picked, steer)

    def write(self, source: str, proposal: Proposal) -> str:
        """`source` with the proposal's knobs rewritten in place; a KnobError when one is not a
        declared knob of `source` or its value lies outside the knob's domain."""
        read_declarations(source).check(proposal.assignments)
        return apply_assignments(source, proposal.assignments)
