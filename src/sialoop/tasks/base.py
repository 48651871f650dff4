"""The Task interface: a spec, instances split train / val / test, and `score`.

Test labels never leave the task: `label()` refuses the test split and `Score.detail` carries
the gold label only for train and val. Only the evaluator scores test instances.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from sialoop.records import Score

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")


class Instance(BaseModel):
    """What a harness sees of one item: an id and JSON inputs, never the label."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    id: str
    split: Split
    inputs: dict[str, Any]


class Task(ABC):
    name: str
    metric: str

    @abstractmethod
    def spec(self) -> str:
        """The task description a harness writer reads."""

    @abstractmethod
    def instances(self, split: Split) -> list[Instance]:
        """All instances of a split, in a fixed order."""

    @abstractmethod
    def label(self, instance: Instance) -> Any:
        """The gold answer of a train or val instance; test labels are refused."""

    @abstractmethod
    def score(self, instance: Instance, output: Any) -> Score:
        """Score one output; test instances are scored against the private labels."""

    @abstractmethod
    def reference_harness(self) -> str:
        """Source of the generation-0 harness."""

    def aggregate(self, scores: list[Score | None]) -> float | None:
        """The split's metric from per-instance scores; an unscored instance counts as 0."""
        if not scores:
            return None
        return sum(s.value if s is not None else 0.0 for s in scores) / len(scores)

    def private_paths(self) -> list[Path]:
        """Files and folders a harness must never read (labels beyond the public train split)."""
        return []

    def summary(self) -> dict[str, Any]:
        """Facts about the data worth reporting (sizes, removed duplicates)."""
        return {}

    def write_public(self, dest: Path) -> None:
        """Write the files a harness may read: the spec, the train split with its labels, and
        `options.json` when instances share an option list (kept out of every train row)."""
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "task.md").write_text(self.spec())
        options = None
        with (dest / "train.jsonl").open("w") as out:
            for inst in self.instances("train"):
                inputs = dict(inst.inputs)
                options = inputs.pop("options", options)
                row = {"id": inst.id, **inputs, "label": self.label(inst)}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        if options is not None:
            (dest / "options.json").write_text(json.dumps(options, ensure_ascii=False))
