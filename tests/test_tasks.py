"""Tasks read real data in place; splits are deterministic; test labels stay private."""

from pathlib import Path

import pytest

from sialoop.tasks import load_task
from sialoop.tasks.lawbench import stratified_split

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA / "lawbench-sia").exists(), reason="../shared/data absent"
)


def test_stratified_split_is_seeded_and_keeps_every_label_in_train():
    labels = ["a"] * 10 + ["b"] * 3 + ["c"] * 1
    train, val = stratified_split(labels, 0.2, seed=1)
    assert (train, val) == stratified_split(labels, 0.2, seed=1)
    assert sorted(train + val) == list(range(14))
    assert {labels[i] for i in train} == {"a", "b", "c"}
    assert sum(labels[i] == "a" for i in val) == 2 and sum(labels[i] == "b" for i in val) == 1


@needs_data
def test_lawbench_split_and_dedup():
    task = load_task("lawbench", DATA, seed=0, val_fraction=0.1)
    s = task.summary()
    assert s["classes"] == 191 and s["test"] == 913
    assert s["test_texts_in_train"] == 12  # one of them twice in train.csv
    assert s["train"] + s["val"] == 5332 - s["train_rows_removed"]
    train_texts = {i.inputs["text"] for i in task.instances("train")}
    val_texts = {i.inputs["text"] for i in task.instances("val")}
    test_texts = {i.inputs["text"] for i in task.instances("test")}
    assert not (train_texts & test_texts) and not (val_texts & test_texts)
    assert [i.id for i in task.instances("val")] == [
        i.id for i in load_task("lawbench", DATA, seed=0).instances("val")
    ]


@needs_data
def test_lawbench_scoring_and_private_test_labels():
    task = load_task("lawbench", DATA)
    val = task.instances("val")[0]
    gold = task.label(val)
    assert task.score(val, gold).value == 1.0
    assert task.score(val, {"label": gold}).correct
    assert task.score(val, "不存在的罪名").detail["valid"] is False
    assert task.score(val, None).value == 0.0
    test = task.instances("test")[0]
    with pytest.raises(PermissionError):
        task.label(test)
    assert "label" not in test.inputs
    verdict = task.score(test, "违法发放贷款")  # row 0 of test_labels.csv
    assert verdict.correct and "gold" not in verdict.detail


@needs_data
def test_public_files_hold_train_only(tmp_path: Path):
    task = load_task("lawbench", DATA)
    task.write_public(tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    assert len(lines) == task.summary()["train"]
    assert '"options"' not in lines[0]
    public = (tmp_path / "train.jsonl").read_text()
    for inst in task.instances("val")[:20] + task.instances("test")[:20]:
        assert inst.inputs["text"] not in public


def test_toy_task():
    task = load_task("toy", Path("."))
    inst = task.instances("val")[0]
    assert task.score(inst, task.label(inst)).correct
    with pytest.raises(PermissionError):
        task.label(task.instances("test")[0])
