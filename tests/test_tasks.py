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


def test_tasks_come_from_a_registry_a_file_a_module_and_entry_points(tmp_path, monkeypatch):
    from sialoop.errors import ConfigError
    from sialoop.tasks import task_names
    from sialoop.tasks.registry import resolve_task_class
    from sialoop.tasks.toy import ToyTask

    assert resolve_task_class("toy") is ToyTask
    assert resolve_task_class("sialoop.tasks.toy:ToyTask") is ToyTask
    example = Path(__file__).resolve().parents[1] / "examples" / "capitals.py"
    capitals = load_task(f"{example}:Capitals", None)
    assert capitals.name == "capitals" and capitals.metric.direction == "higher"
    assert [i.id for i in capitals.instances("val")] == ["Chile", "Spain", "Cuba"]
    with pytest.raises(PermissionError):
        capitals.label(capitals.instances("test")[0])
    # an installed package's entry point in the group sialoop.tasks
    dist = tmp_path / "mytasks-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mytasks\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[sialoop.tasks]\nmine = mytasks_mod:Mine\n")
    (tmp_path / "mytasks_mod.py").write_text(
        "from sialoop.tasks.toy import ToyTask\n\nclass Mine(ToyTask):\n    name = 'mine'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert task_names()["mine"] == "mytasks_mod:Mine"
    assert load_task("mine", None).name == "mine"
    for bad, needle in [
        ("nope", "unknown task 'nope'"),
        ("sialoop.tasks.toy:Nope", "no Task subclass named 'Nope'"),
        ("no_such_module_x:Task", "cannot be imported"),
        (f"{tmp_path / 'missing.py'}:X", "does not exist"),
    ]:
        with pytest.raises(ConfigError, match=needle) as err:
            load_task(bad, None)
        assert "\n" not in str(err.value)


def test_lawbench_without_data_offline_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("SIALOOP_OFFLINE", "1")
    monkeypatch.setenv("SIALOOP_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("SIALOOP_HOME", str(tmp_path / "home"))
    from sialoop.errors import DataError

    with pytest.raises(DataError, match="--data"):
        load_task("lawbench", None)


@pytest.mark.slow
def test_lawbench_data_is_fetched_once_from_the_published_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("SIALOOP_DATA", str(tmp_path / "none"))
    monkeypatch.setenv("SIALOOP_HOME", str(tmp_path / "home"))
    task = load_task("lawbench", None)
    assert task.summary()["test"] == 913 and task.summary()["classes"] == 191
    assert (tmp_path / "home" / "data" / "lawbench-sia" / "test_labels.csv").is_file()
