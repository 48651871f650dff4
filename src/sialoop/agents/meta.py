"""The offline Meta-Agent: turns a harness Decision into a new harness file through operators.

It reads the Decision's focus (which family of knobs the evidence points at) and the
incumbent's constants, and proposes the first move of that family not tried before on this
parent; once that family has had ROTATE_AFTER more tries than another, or is exhausted, the
less-tried families come first. With no move left it proposes
nothing, and the loop records that.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sialoop.harness.operators import Operator, apply_operator, read_constants
from sialoop.records import Decision

Move = Callable[[dict[str, Any], dict[str, Any]], list[Operator | None]]

FAMILIES = ("examples", "shortlist", "scoring", "format")
ROTATE_AFTER = 2  # edits of the focus family tried on a parent before the others come first


def _examples(c: dict[str, Any], settings: dict[str, Any]) -> list[Operator | None]:
    moves: list[Operator | None] = []
    if c.get("EXAMPLE_SELECTION") == "fixed":
        moves.append(
            Operator(
                family="examples",
                assignments={"EXAMPLE_SELECTION": "similar"},
                why="few-shot examples retrieved by similarity to the query",
            )
        )
    if "N_EXAMPLES" in c:
        for n in (c["N_EXAMPLES"] + 2, max(1, c["N_EXAMPLES"] - 1)):
            moves.append(
                Operator(
                    family="examples",
                    assignments={"N_EXAMPLES": n},
                    why=f"{n} few-shot examples instead of {c['N_EXAMPLES']}",
                )
            )
    if "EXAMPLE_CHARS" in c:
        moves.append(
            Operator(
                family="examples",
                assignments={"EXAMPLE_CHARS": c["EXAMPLE_CHARS"] + 80},
                why="longer example texts",
            )
        )
    return moves


def _shortlist(c: dict[str, Any], settings: dict[str, Any]) -> list[Operator | None]:
    moves: list[Operator | None] = []
    if c.get("SHORTLIST_SOURCE") == "neighbours":
        moves.append(
            Operator(
                family="shortlist",
                assignments={"SHORTLIST_SOURCE": "classifier"},
                why="shortlist from a linear classifier fitted on train",
            )
        )
    if "SHORTLIST" in c:
        for k in (c["SHORTLIST"] * 2, max(2, c["SHORTLIST"] // 2)):
            moves.append(
                Operator(
                    family="shortlist",
                    assignments={"SHORTLIST": k},
                    why=f"shortlist of {k} charges instead of {c['SHORTLIST']}",
                )
            )
    return moves


PRIOR_LADDER = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # prior weights, about 3x apart
BIG_GAP = 0.3  # an unused prior this much better than the answer: skip a rung of the ladder


def _prior_weight(weight: float, why: str) -> Operator:
    return Operator(family="scoring", assignments={"PRIOR_WEIGHT": weight}, why=why)


def _scoring(c: dict[str, Any], settings: dict[str, Any]) -> list[Operator | None]:
    """Prior weight up or down the ladder, and the other normalisation. With the hint
    `prior_up` (the prior beats the answer) heavier weights come first, skipping a rung when the
    gap is large; otherwise one step up, the other normalisation, then one step down."""
    vote = "vote of retrieval/classifier prior, weight {x}, with the LM score"
    up, down, normalize = [], [], []
    if "PRIOR_WEIGHT" in c:
        w = c["PRIOR_WEIGHT"]
        heavier = [x for x in PRIOR_LADDER if x > max(w, 0.3)]  # from 0, start at 1
        down = [_prior_weight(x, vote.format(x=x)) for x in PRIOR_LADDER if 0 < x < w][-1:]
        if settings.get("hint") == "prior_up":
            gap = float(settings.get("prior_gap", 0.0))
            picks = heavier[1::-1] if gap >= BIG_GAP else heavier[:2]
            why = "prior weight {x} (was {w}): the prior beats the answer by {gap:.0%}"
            up = [_prior_weight(x, why.format(x=x, w=w, gap=gap)) for x in picks]
        else:
            up = [_prior_weight(x, vote.format(x=x)) for x in heavier[:1]]
    if "NORMALIZE" in c:
        other = "mean" if c["NORMALIZE"] == "sum" else "sum"
        normalize = [
            Operator(
                family="scoring",
                assignments={"NORMALIZE": other},
                why=f"option log-probabilities normalised by {other}",
            )
        ]
    if settings.get("hint") == "prior_up":
        return [*up, *normalize, *down]
    return [*up[:1], *normalize, *up[1:], *down]


def _format(c: dict[str, Any], settings: dict[str, Any]) -> list[Operator | None]:
    if "QUERY_CHARS" in c:
        return [
            Operator(
                family="format",
                assignments={"QUERY_CHARS": c["QUERY_CHARS"] + 200},
                why="more of the case text in the prompt",
            )
        ]
    return []


_MOVES: dict[str, Move] = {
    "examples": _examples,
    "shortlist": _shortlist,
    "scoring": _scoring,
    "format": _format,
}


class OfflineMetaAgent:
    """Proposes operator edits from the Decision's focus; never repeats an edit on a parent."""

    def propose(self, source: str, decision: Decision, tried: set[str]) -> Operator | None:
        constants = read_constants(source)
        focus = decision.settings.get("focus")
        # The focus family first, unless it was already tried more than the others on this
        # parent: failed edits of one family should not starve the rest.
        tries = {f: sum(k.startswith(f + ":") for k in tried) for f in FAMILIES}
        order = sorted(
            FAMILIES, key=lambda f: (tries[f] - (f == focus) * (ROTATE_AFTER - 1), f != focus)
        )
        for family in order:
            for op in _MOVES[family](constants, decision.settings):
                if op is not None and op.key not in tried:
                    return op
        return None

    def write(self, source: str, operator: Operator) -> str:
        return apply_operator(source, operator)
