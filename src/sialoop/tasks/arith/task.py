"""A small generated arithmetic task with free-form numeric answers, for tests and demos.

Each instance asks "What is a + b?" (or a - b, a * b with a small factor) about seeded random
numbers; the answer is the number. Questions are unique across the three splits, so no test
question occurs in train or val. The output is free text (or a dict whose "answer" holds it): the
first number in it is the prediction, so a harness can be scored even when the model rambles.

Guaranteed: the splits depend on `seed` only; `label` refuses test instances and
`Score.detail` carries the gold number only for train and val. Not guaranteed: that a
prediction was meant as the answer (the first number wins, e.g. "17 + 25 = 42" predicts 17).
"""

from __future__ import annotations

import random
import re
from typing import Any

from sialoop.records import Score
from sialoop.tasks.base import Instance, Metric, Split, Task
from sialoop.tasks.templates import template_source

_SIZES: dict[Split, int] = {"train": 32, "val": 16, "test": 16}
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")

SPEC = """# Arithmetic

`instance["question"]` asks for the value of a small sum, difference or product, e.g.
"What is 17 + 25?". Answer with the number.

Output: a string (or a dict with key "answer"); the first number in it is the prediction.
Metric: accuracy (the prediction equals the gold number). Public files: `public/train.jsonl`
(id, question, label).
"""


def parse_number(output: Any) -> str | None:
    """The first number in `output` (a string, a number, or a dict's "answer") written
    canonically ("42", "-3", "2.5"), or None when there is none."""
    if isinstance(output, dict):
        output = output.get("answer")
    if isinstance(output, bool):
        return None
    if isinstance(output, int | float):
        output = str(output)
    if not isinstance(output, str):
        return None
    found = _NUMBER.search(output)
    if found is None:
        return None
    value = float(found.group())
    return str(int(value)) if value.is_integer() else repr(value)


def _problem(rng: random.Random) -> tuple[str, int]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 9)
    else:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
    gold = a + b if op == "+" else a - b if op == "-" else a * b
    return f"What is {a} {op} {b}?", gold


class ArithTask(Task):
    name = "arith"
    metric = Metric(
        name="accuracy",
        correct="the number in the answer equals the gold number",
        failure_value=0.0,
    )

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        seen: set[str] = set()
        self._gold: dict[tuple[Split, str], int] = {}
        self._rows: dict[Split, list[tuple[str, str]]] = {}
        for split, n in _SIZES.items():
            rows: list[tuple[str, str]] = []
            while len(rows) < n:
                question, gold = _problem(rng)
                if question in seen:
                    continue
                seen.add(question)
                item_id = f"{split}-{len(rows)}"
                rows.append((item_id, question))
                self._gold[split, item_id] = gold
            self._rows[split] = rows

    def spec(self) -> str:
        return SPEC

    def instances(self, split: Split) -> list[Instance]:
        return [Instance(id=i, split=split, inputs={"question": q}) for i, q in self._rows[split]]

    def label(self, instance: Instance) -> str:
        """The gold number as text (the form answers take)."""
        if instance.split == "test":
            raise PermissionError("test labels are for the evaluator only")
        return str(self._gold[instance.split, instance.id])

    def score(self, instance: Instance, output: Any) -> Score:
        gold = str(self._gold[instance.split, instance.id])
        prediction = parse_number(output)
        detail: dict[str, Any] = {"prediction": prediction, "valid": prediction is not None}
        if instance.split != "test":
            detail["gold"] = gold
        return Score(value=float(prediction == gold), correct=prediction == gold, detail=detail)

    def reference_harness(self) -> str:
        return template_source(__package__, "sampling.py")
