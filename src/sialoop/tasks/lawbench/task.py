"""LawBench charge prediction on SIA's split (191 charges, top-1 accuracy).

Reads `<data>/lawbench-sia/{train.csv,test.csv,test_labels.csv,classes.json}` in place (where
the data root comes from: `data.py`).
train.csv is split into train and val (stratified by charge, seeded); test texts that also occur
verbatim in train.csv are removed from train, so nothing the loop learns from is a test item.
test_labels.csv is read only when a test instance is scored.
"""

from __future__ import annotations

import csv
import json
import random
from collections import defaultdict
from functools import cached_property
from pathlib import Path
from typing import Any

from sialoop.errors import DataError
from sialoop.records import Score
from sialoop.tasks.base import Instance, Metric, Split, Task
from sialoop.tasks.lawbench.data import FOLDER, locate
from sialoop.tasks.templates import template_source

SPEC = """# LawBench charge prediction (罪名预测)

Each instance is the fact description of a Chinese criminal case (`instance["text"]`).
Predict the single charge (罪名) the defendant is convicted of. The answer must be exactly one
of the 191 names in `instance["options"]` (also in `public/options.json`); brackets are part of
the name, e.g. `[走私、贩卖、运输、制造]毒品`. Any other string counts as wrong.

Output: the charge name as a string (or a dict with key "label").
Metric: top-1 accuracy.
Public files: `public/train.jsonl` (id, text, label) is the labelled train split.
"""


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def stratified_split(
    labels: list[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Indices for train and val: per label, a seeded shuffle puts round(n * fraction) in val,
    at least one when the label has 3 or more items, never all of them."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_label):
        idx = by_label[label][:]
        rng.shuffle(idx)
        n_val = round(len(idx) * val_fraction)
        if len(idx) >= 3:
            n_val = max(1, n_val)
        n_val = min(n_val, len(idx) - 1)
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


class LawBenchTask(Task):
    name = "lawbench"
    metric = Metric(
        name="top1", correct="the predicted charge is the gold charge", failure_value=0.0
    )

    def __init__(self, data: Path | None = None, *, seed: int = 0, val_fraction: float = 0.1):
        self.dir = locate(data) / FOLDER
        self.seed = seed
        self.val_fraction = val_fraction

    @cached_property
    def classes(self) -> list[str]:
        return json.loads((self.dir / "classes.json").read_text(encoding="utf-8"))

    @cached_property
    def _test_rows(self) -> list[dict[str, str]]:
        return _read_csv(self.dir / "test.csv")

    @cached_property
    def _train_val(self) -> tuple[list[dict[str, str]], list[dict[str, str]], dict[str, int]]:
        rows = _read_csv(self.dir / "train.csv")
        test_texts = {r["text"] for r in self._test_rows}
        kept = [r for r in rows if r["text"] not in test_texts]
        shared = {r["text"] for r in rows} & test_texts
        removed = {"test_texts_in_train": len(shared), "train_rows_removed": len(rows) - len(kept)}
        train_idx, val_idx = stratified_split(
            [r["label"] for r in kept], self.val_fraction, self.seed
        )
        return [kept[i] for i in train_idx], [kept[i] for i in val_idx], removed

    def spec(self) -> str:
        return SPEC

    def _instance(self, row: dict[str, str], split: Split) -> Instance:
        return Instance(
            id=row["id"], split=split, inputs={"text": row["text"], "options": self.classes}
        )

    def instances(self, split: Split) -> list[Instance]:
        if split == "test":
            return [self._instance(r, "test") for r in self._test_rows]
        train, val, _ = self._train_val
        return [self._instance(r, split) for r in (train if split == "train" else val)]

    @cached_property
    def _gold(self) -> dict[tuple[str, str], str]:
        train, val, _ = self._train_val
        gold = {("train", r["id"]): r["label"] for r in train}
        gold.update({("val", r["id"]): r["label"] for r in val})
        return gold

    def label(self, instance: Instance) -> str:
        if instance.split == "test":
            raise PermissionError("test labels are for the evaluator only")
        return self._gold[(instance.split, instance.id)]

    def _test_label(self, instance_id: str) -> str:
        # Read on demand and not cached on the task, so no long-lived object holds test labels.
        for row in _read_csv(self.dir / "test_labels.csv"):
            if row["id"] == instance_id:
                return row["label"]
        raise DataError(f"test_labels.csv has no id {instance_id}: the data folder is inconsistent")

    def score(self, instance: Instance, output: Any) -> Score:
        if isinstance(output, dict):
            output = output.get("label")
        pred = output.strip() if isinstance(output, str) else None
        gold = self._test_label(instance.id) if instance.split == "test" else self.label(instance)
        valid = pred in set(self.classes)
        correct = valid and pred == gold
        detail: dict[str, Any] = {"prediction": pred, "valid": valid}
        if instance.split != "test":
            detail["gold"] = gold
        return Score(value=1.0 if correct else 0.0, correct=correct, detail=detail)

    def write_public(self, dest: Path) -> None:
        """task.md, train.jsonl (id, text, label) and options.json: the 191 charges are kept
        out of every train row, where they would be repeated 4,787 times."""
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "task.md").write_text(self.spec())
        with (dest / "train.jsonl").open("w") as out:
            for inst in self.instances("train"):
                row = {"id": inst.id, "text": inst.inputs["text"], "label": self.label(inst)}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        (dest / "options.json").write_text(json.dumps(self.classes, ensure_ascii=False))

    def reference_harness(self) -> str:
        return template_source(__package__, "fewshot.py")

    def private_paths(self) -> list[Path]:
        # The whole data root: its other folders (CAIL2018, LawBench 3-3) hold test texts too.
        return [self.dir.parent]

    def summary(self) -> dict[str, Any]:
        train, val, removed = self._train_val
        return {
            "train": len(train),
            "val": len(val),
            "test": len(self._test_rows),
            "classes": len(self.classes),
            **removed,
        }
