"""A small generated classification task that runs in seconds, for tests and demos.

Each text names an object; its label is the object's colour. The mapping is fixed, so a model
(or a harness with retrieval) can learn it from train.
"""

from __future__ import annotations

import random
from typing import Any

from sialoop.records import Score
from sialoop.tasks.base import Instance, Split, Task
from sialoop.tasks.templates import template_source

COLOURS = {
    "red": ["tomato", "cherry", "ruby", "brick"],
    "green": ["leaf", "lime", "frog", "emerald"],
    "blue": ["sky", "sapphire", "ocean", "denim"],
    "yellow": ["banana", "lemon", "sun", "canary"],
}
_SIZES: dict[Split, int] = {"train": 32, "val": 16, "test": 16}

SPEC = """# Toy colours

`instance["text"]` mentions an object; answer its colour, one of `instance["options"]`.
Output: the colour as a string. Metric: accuracy. Public files: `public/train.jsonl`.
"""


class ToyTask(Task):
    name = "toy"

    def __init__(self, seed: int = 0):
        rng = random.Random(seed)
        pairs = [(obj, colour) for colour, objs in COLOURS.items() for obj in objs]
        self._rows: dict[Split, list[tuple[str, str, str]]] = {}
        for split, n in _SIZES.items():
            rows = []
            for i in range(n):
                obj, colour = rng.choice(pairs)
                rows.append((f"{split}-{i}", f"The {obj} in picture {rng.randint(1, 99)}.", colour))
            self._rows[split] = rows

    def spec(self) -> str:
        return SPEC

    def instances(self, split: Split) -> list[Instance]:
        options = list(COLOURS)
        return [
            Instance(id=i, split=split, inputs={"text": t, "options": options})
            for i, t, _ in self._rows[split]
        ]

    def _gold(self, instance: Instance) -> str:
        return next(c for i, _, c in self._rows[instance.split] if i == instance.id)

    def label(self, instance: Instance) -> str:
        if instance.split == "test":
            raise PermissionError("test labels are for the evaluator only")
        return self._gold(instance)

    def score(self, instance: Instance, output: Any) -> Score:
        if isinstance(output, dict):
            output = output.get("label")
        pred = output.strip() if isinstance(output, str) else None
        gold = self._gold(instance)
        detail: dict[str, Any] = {"prediction": pred, "valid": pred in COLOURS}
        if instance.split != "test":
            detail["gold"] = gold
        return Score(value=float(pred == gold), correct=pred == gold, detail=detail)

    def reference_harness(self) -> str:
        return template_source(__package__, "option_scoring.py")
