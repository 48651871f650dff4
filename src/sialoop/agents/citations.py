"""Does a rationale quote only numbers it was given?

The rule: a number quoted with d decimals (`0.42`, `42%`, `7`) matches a number of the input
when the input's value, as a fraction, as a percent (x 100) or from a percent (/ 100), rounds to
the quoted one at d decimals (within half a unit of its last digit). Identifiers such as `v12`
or `gen3` are not numbers: a digit run glued to a letter is skipped.
"""

from __future__ import annotations

import re

_QUOTED = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.]*[A-Za-z_])(?:%)?")
_INPUT = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def input_numbers(text: str) -> set[float]:
    return {float(m) for m in _INPUT.findall(text)}


def quoted_numbers(text: str) -> list[str]:
    return _QUOTED.findall(text)


def _matches(quoted: str, given: set[float]) -> bool:
    value = float(quoted.rstrip("%"))
    digits = quoted.rstrip("%").partition(".")[2]
    half = 0.5 * 10 ** -len(digits) + 1e-9
    return any(
        abs(v * scale - value) <= half * (1 + 1e-9) for v in given for scale in (1, 100, 0.01)
    )


def uncited(rationale: str, given_text: str) -> list[str]:
    """The quoted numbers of `rationale` that match no number of `given_text`."""
    given = input_numbers(given_text)
    return [q for q in quoted_numbers(rationale) if not _matches(q, given)]
