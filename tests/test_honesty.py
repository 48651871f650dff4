"""A canary label planted in test never reaches anything the agents, the trainer or the harness
read: no run file, no stored prompt, decision, dataset or trajectory contains it."""

from pathlib import Path

from rich.console import Console

from sialoop.config import load_config
from sialoop.loop import drive, new_run
from sialoop.runlock import RunLock
from sialoop.tasks.toy import ToyTask
from sialoop.train import sft_examples

CANARY = "zebra-canary-7f3a"


class CanaryToy(ToyTask):
    def __init__(self) -> None:
        super().__init__(seed=0)
        self._rows["test"] = [(i, text, CANARY) for i, text, _ in self._rows["test"]]


def test_canary_test_label_is_never_seen(tmp_path: Path, tiny_model_dir: Path):
    cfg = load_config(None, {
        "task": "toy", "runs_dir": str(tmp_path), "policy.model": str(tiny_model_dir),
        "policy.dtype": "float32", "loop.generations": 2, "loop.train_batch": 16,
        "loop.train_items": 32, "train.max_steps": 4, "train.batch_size": 8, "train.max_len": 256,
        "loop.levers": ["weights", "harness"], "loop.lever_patience": 1,
    })  # fmt: skip
    task = CanaryToy()
    store = new_run(cfg, task, "r")
    drive(store, task, cfg, Console(quiet=True), RunLock(store.root, "run").acquire())
    assert store.evaluations("test"), "the evaluator scored test"
    assert all(t.score is not None for t in store.trajectories(split="test"))

    for path in store.root.rglob("*"):  # run.db, harness files, public/, adapters, scratch
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    for call in store.llm_calls():
        assert CANARY not in str(call.prompt) and CANARY not in call.completion
    for decision in store.decisions():
        assert CANARY not in decision.model_dump_json()
    for version in store.versions():
        assert CANARY not in version.model_dump_json()
        if version.generation == 0:
            assert all(CANARY not in e.model_dump_json() for e in sft_examples(store, task, "v0"))
