"""The Task interface: a spec, instances split train / val / test, `score`, and its `Metric`.

Test labels never leave the task: `label()` refuses the test split and `Score.detail` carries
the gold label only for train and val. Only the evaluator scores test instances.

A task declares its `Metric` (name, direction, aggregation, what "correct" means); the gate,
the best-version choice, gains, the Feedback-Agent and the report read the direction from it,
so a lower-is-better score (a time, an error) is as normal as an accuracy.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

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


class Metric(BaseModel):
    """What a task's score means.

    `direction`: whether a higher or a lower value is better. `aggregate`: how per-instance
    values make the split's value ("mean" or "median"; a task may override `Task.aggregate` for
    a whole-split metric). `correct`: what "correct" means, when anything does (answer tasks);
    None for a program task whose score is a measurement. `failure_value`: the value an item that
    was never scored counts as in the split's aggregate, when the task can say (an accuracy: 0,
    a wrong answer); None means a split with an unscored item has no value at all (a time or an
    error has no honest stand-in: 0 would be the best value).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    direction: Literal["higher", "lower"] = "higher"
    aggregate: Literal["mean", "median"] = "mean"
    correct: str | None = None
    failure_value: float | None = None

    @property
    def sign(self) -> float:
        """+1 when higher is better, -1 when lower is: `sign * value` is always "higher is better"."""
        return 1.0 if self.direction == "higher" else -1.0

    def oriented(self, value: float | None) -> float | None:
        return None if value is None else self.sign * value

    def gain(self, new: float | None, old: float | None) -> float | None:
        """How much better `new` is than `old`, in the metric's units (negative: worse)."""
        if new is None or old is None:
            return None
        return self.sign * (new - old)

    def better(self, a: float | None, b: float | None) -> bool:
        """`a` strictly better than `b`; a value is better than None, None never is."""
        if a is None:
            return False
        return b is None or self.sign * (a - b) > 0

    def rank_key(self, value: float | None) -> tuple[bool, float]:
        """Sort key, larger is better: None ranks below every value."""
        return (value is not None, self.sign * value if value is not None else 0.0)


ACCURACY = Metric(name="accuracy", correct="the answer equals the gold label", failure_value=0.0)


class Task(ABC):
    """A task. Subclasses set `name` and `metric`; `noise` names how the gate pairs scores
    ("items": one value per instance, samples averaged; "units": the `Score.detail["units"]`
    mapping of each item, e.g. repeated timings or per-cell errors, paired unit by unit)."""

    name: str
    metric: ClassVar[Metric] = ACCURACY
    noise: ClassVar[Literal["items", "units"]] = "items"
    # Config keys this task needs other defaults for (a tree like the TOML's: sandbox limits,
    # loop budget); a config file and --set still override them.
    config_defaults: ClassVar[dict[str, Any]] = {}

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

    def adapt_harness(self, source: str) -> str:
        """The harness file to run for `source` (a user's file, a Meta-Agent's): unchanged
        here; a program task may accept its bare program as a harness answering itself."""
        return source

    def noise_margin(self) -> float:
        """The least gain, in the metric's units, a re-measurement of an unchanged version can
        show by chance, when the task can measure it (a timing): the gate's `min_gain` is at
        least this. 0.0: the gate's tests alone account for noise."""
        return 0.0

    def counts_toward_score(self, instance: Instance) -> bool:
        """Whether `instance`'s score enters its split's value. An instance that is only
        reported beside it (a transfer dataset, a sanity check) returns False: it is still
        rolled out, scored and stored, and a failure of it is not the split's failure."""
        return True

    def aggregate(self, scores: Sequence[Score | None]) -> float | None:
        """The split's value from per-instance scores, by `metric.aggregate`. An unscored item
        counts as `metric.failure_value`; without one, a split with an unscored item is None."""
        if not scores:
            return None
        fill = self.metric.failure_value
        if fill is None and any(s is None for s in scores):
            return None
        values = sorted(s.value if s is not None else float(fill or 0.0) for s in scores)
        if self.metric.aggregate == "median":
            mid = len(values) // 2
            return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
        return sum(values) / len(values)

    def private_paths(self) -> list[Path]:
        """Files and folders a harness must never read (labels beyond the public train split)."""
        return []

    def summary(self) -> dict[str, Any]:
        """Facts about the data worth reporting: items per split (a task adds removed
        duplicates and the like)."""
        return {split: len(self.instances(split)) for split in ("train", "val", "test")}

    def write_public(self, dest: Path) -> None:
        """Write the files a harness may read: the spec and the train split with its labels
        (one JSON line per instance: id, inputs, label). A task with more public files (an
        option list shared by every instance, say) overrides this."""
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "task.md").write_text(self.spec())
        with (dest / "train.jsonl").open("w") as out:
            for inst in self.instances("train"):
                row = {"id": inst.id, **inst.inputs, "label": self.label(inst)}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
